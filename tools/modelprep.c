/*
 * modelprep - the command-line client of modelprepd. Every command is one
 * or a few REST calls; job commands submit a job and then follow its
 * events to the end with live progress bars (tools/cli/). Nothing here
 * reads the data dir or calls the loader: the client shows what the API
 * shows, so it works against a remote node as well as a local one.
 *
 *   modelprep [--url URL] [--token-file FILE] [--json] COMMAND [ARGS]
 *
 * Exit status: 0 done, 1 the job failed (or an API error), 2 usage, 3 the
 * server could not be reached, 130 a second Ctrl-C left the job running.
 */
#include <curl/curl.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tools/cli/cli.h"

#define DEFAULT_URL "http://127.0.0.1:8420"
#define MAX_ARGS 128

static const char USAGE[] =
    "usage: modelprep [--url URL] [--token-file FILE] [--json] COMMAND [ARGS]\n"
    "\n"
    "jobs (submit, then follow to the end; --detach returns the id at once):\n"
    "  pull REPO[@REV]        download a hub repo into the node's cache\n"
    "  convert MODEL          .bin/.pt/GGUF -> safetensors\n"
    "  inspect MODEL          architecture, params, dtypes, quantization, bytes per TP rank\n"
    "  shard MODEL            one checkpoint per tensor-parallel rank (--tp-size N)\n"
    "  quantize MODEL         fp8 / fp8-channel / fp8-block / nf4 / int8 (--method M)\n"
    "  load MODEL             warm_load onto the node's devices\n"
    "  prepare MODEL          download/convert/inspect/shard/load, what is missing\n"
    "  verify MODEL           re-hash the model's files\n"
    "  job params: --NAME VALUE (NAME as in the API, - or _), -p NAME=JSON, --revision REV\n"
    "\n"
    "other commands:\n"
    "  jobs [--state S] [--type T] [--model M] [--parent ID] [--limit N]\n"
    "  watch JOB              follow a job's events to its end\n"
    "  cancel JOB\n"
    "  ls                     the node's models\n"
    "  ps                     resident weights, per device\n"
    "  unload RESIDENT|MODEL [--force]\n"
    "  rm REPO                evict a hub model from the cache\n"
    "  devices\n"
    "\n"
    "environment: MODELPREP_URL (default " DEFAULT_URL "), MODELPREP_TOKEN\n"
    "exit status: 0 ok, 1 failed, 2 usage, 3 server unreachable, 130 left running\n";

typedef struct opts {
    const char *url;
    char *token;
    bool json, detach, force;
    const char *args[MAX_ARGS]; /* what is left after the global options */
    int nargs;
} opts;

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("modelprep: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n(modelprep --help for usage)\n", stderr);
    return CLI_EXIT_USAGE;
}

static const char *jstr(json_t *o, const char *k) {
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static void print_json(json_t *doc) {
    char *s = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (s) puts(s);
    free(s);
}

/* An answer that is not the expected status: the message and the exit
 * status it maps to. */
static int api_failure(int rc, cli_resp *r, const char *what) {
    if (rc == CLI_HTTP_UNREACHABLE) {
        fprintf(stderr, "modelprep: %s\n", r->error);
        return CLI_EXIT_UNREACHABLE;
    }
    char msg[1024];
    if (rc != CLI_HTTP_OK)
        snprintf(msg, sizeof msg, "%s", r->error);
    else
        cli_problem_text(r, msg, sizeof msg);
    fprintf(stderr, "modelprep: %s: %s\n", what, msg);
    /* The server refused the request as invalid: the user's to fix. */
    return rc == CLI_HTTP_OK && (r->status == 400 || r->status == 422) ? CLI_EXIT_USAGE
                                                                       : CLI_EXIT_FAILED;
}

/* GET path, expecting 200 and a JSON object. */
static int get_doc(cli_client *c, const char *path, json_t **out) {
    cli_resp r;
    int rc = cli_request(c, "GET", path, NULL, &r);
    if (rc != CLI_HTTP_OK || r.status != 200 || !json_is_object(r.doc)) {
        if (rc == CLI_HTTP_OK && r.status == 200)
            snprintf(r.error, sizeof r.error, "the answer to GET %s is not a JSON object", path),
                rc = CLI_HTTP_BAD_BODY;
        int st = api_failure(rc, &r, path);
        cli_resp_free(&r);
        return st;
    }
    *out = r.doc;
    return 0;
}

/* ---- job params -------------------------------------------------------------------- */

static int parse_int(const char *v, json_int_t *out) {
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (!*v || *end || errno) return -1;
    *out = n;
    return 0;
}

/* The value of one param as JSON, typed by its schema: integers, numbers,
 * booleans, comma lists for arrays, JSON for objects (and anything that
 * starts like JSON). NULL when the value does not fit. */
static json_t *typed_value(json_t *schema, const char *v) {
    const char *type = jstr(schema, "type");
    json_int_t n;
    if ((v[0] == '[' || v[0] == '{') &&
        (!strcmp(type, "array") || !strcmp(type, "object") || !type[0]))
        return json_loads(v, JSON_DECODE_ANY, NULL);
    if (!strcmp(type, "integer")) return parse_int(v, &n) == 0 ? json_integer(n) : NULL;
    if (!strcmp(type, "number")) {
        char *end;
        double d = strtod(v, &end);
        return *v && !*end ? json_real(d) : NULL;
    }
    if (!strcmp(type, "boolean")) {
        if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes")) return json_true();
        if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no")) return json_false();
        return NULL;
    }
    if (!strcmp(type, "array")) {
        json_t *items = json_object_get(schema, "items");
        json_t *arr = json_array();
        char *copy = strdup(v), *save = NULL;
        if (!arr || !copy) {
            json_decref(arr);
            free(copy);
            return NULL;
        }
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            json_t *e = typed_value(items, tok);
            if (!e || json_array_append_new(arr, e) != 0) {
                json_decref(arr);
                arr = NULL;
                break;
            }
        }
        free(copy);
        return arr;
    }
    if (!strcmp(type, "object")) return NULL;
    return json_string(v);
}

/* -p NAME=VALUE: VALUE as JSON when it parses, else as a string. */
static json_t *loose_value(const char *v) {
    json_t *j = json_loads(v, JSON_DECODE_ANY, NULL);
    return j ? j : json_string(v);
}

static void list_params(json_t *props) {
    const char *k;
    json_t *v;
    fputs("params:", stderr);
    json_object_foreach(props, k, v) {
        const char *t = jstr(v, "type");
        json_t *en = json_object_get(v, "enum");
        fputs(" --", stderr);
        for (const char *p = k; *p; p++)
            fputc(*p == '_' ? '-' : *p, stderr);
        if (json_is_array(en)) {
            fputs(" (", stderr);
            for (size_t i = 0; i < json_array_size(en); i++)
                fprintf(stderr, "%s%s", i ? "|" : "", json_string_value(json_array_get(en, i)));
            fputs(")", stderr);
        } else if (t[0]) {
            fprintf(stderr, " <%s>", t);
        }
    }
    if (json_object_size(props) == 0) fputs(" none", stderr);
    fputc('\n', stderr);
}

typedef struct job_req {
    const char *cmd, *type;
    json_t *body; /* {type, model, revision?, params} */
} job_req;

/* Builds the request of a job command from its arguments, typing each
 * param by the server's own schema (GET /openapi.json, Params_<type>), so
 * a param added to the server needs no change here. */
static int build_job(cli_client *c, opts *o, job_req *jr) {
    json_t *api = NULL;
    int st = get_doc(c, "/openapi.json", &api);
    if (st) return st;
    char name[64];
    snprintf(name, sizeof name, "Params_%s", jr->type);
    json_t *schema =
        json_object_get(json_object_get(json_object_get(api, "components"), "schemas"), name);
    json_t *props = json_object_get(schema, "properties");
    if (!json_is_object(props)) {
        json_decref(api);
        fprintf(stderr, "modelprep: the server has no job type %s\n", jr->type);
        return CLI_EXIT_FAILED;
    }
    json_t *params = json_object();
    const char *model = NULL, *revision = NULL;
    int rc = 0;
    for (int i = 1; params && !rc && i < o->nargs; i++) {
        const char *a = o->args[i];
        if (!strcmp(a, "-p") || !strncmp(a, "-p", 2)) {
            const char *kv = a[2] ? a + 2 : (i + 1 < o->nargs ? o->args[++i] : NULL);
            const char *eq = kv ? strchr(kv, '=') : NULL;
            if (!eq || eq == kv) {
                rc = usage_error("-p takes NAME=VALUE");
                break;
            }
            char key[64];
            snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
            json_object_set_new(params, key, loose_value(eq + 1));
        } else if (!strncmp(a, "--", 2) && a[2]) {
            char key[64];
            const char *eq = strchr(a, '=');
            snprintf(key, sizeof key, "%.*s", (int)(eq ? eq - a - 2 : (long)strlen(a + 2)), a + 2);
            for (char *p = key; *p; p++)
                if (*p == '-') *p = '_';
            const char *val = eq ? eq + 1 : NULL;
            if (!strcmp(key, "revision")) {
                revision = val ? val : (i + 1 < o->nargs ? o->args[++i] : NULL);
                if (!revision) rc = usage_error("--revision takes a value");
                continue;
            }
            json_t *ps = json_object_get(props, key);
            if (!ps) {
                rc = usage_error("%s: %s jobs have no param %s", jr->cmd, jr->type, key);
                list_params(props);
                break;
            }
            bool is_bool = !strcmp(jstr(ps, "type"), "boolean");
            if (!val && is_bool) val = "true";
            if (!val) val = i + 1 < o->nargs ? o->args[++i] : NULL;
            if (!val) {
                rc = usage_error("--%s takes a value", key);
                break;
            }
            json_t *v = typed_value(ps, val);
            if (!v) {
                rc = usage_error("--%s: %s is not a valid %s", key, val, jstr(ps, "type"));
                break;
            }
            json_object_set_new(params, key, v);
        } else if (a[0] == '-' && a[1]) {
            rc = usage_error("unknown option %s", a);
        } else if (!model) {
            model = a;
        } else {
            rc = usage_error("%s takes one model (got %s and %s)", jr->cmd, model, a);
        }
    }
    json_decref(api);
    if (!params) {
        fprintf(stderr, "modelprep: out of memory\n");
        return CLI_EXIT_FAILED;
    }
    if (!rc && !model) rc = usage_error("%s needs a model", jr->cmd);
    if (rc) {
        json_decref(params);
        return rc;
    }
    /* REPO@REV for hub ids; a path keeps any '@' it has. */
    char m[1024];
    snprintf(m, sizeof m, "%s", model);
    char *at = m[0] != '/' ? strrchr(m, '@') : NULL;
    if (at) {
        *at = 0;
        if (!at[1]) {
            json_decref(params);
            return usage_error("empty revision after @");
        }
        if (!revision) revision = model + (at - m) + 1;
    }
    jr->body = json_pack("{s:s,s:s,s:o}", "type", jr->type, "model", m, "params", params);
    if (jr->body && revision) json_object_set_new(jr->body, "revision", json_string(revision));
    if (!jr->body) {
        fprintf(stderr, "modelprep: out of memory\n");
        return CLI_EXIT_FAILED;
    }
    return 0;
}

/* ---- results ------------------------------------------------------------------------- */

static void print_inspection(json_t *res, const char *model) {
    char a[64], b[64], line[512];
    cli_table t;
    table_init(&t, 2, "model", model);
    const char *arch = jstr(res, "architecture"), *mt = jstr(res, "model_type");
    snprintf(line, sizeof line, "%s%s%s%s", arch[0] ? arch : "-", mt[0] ? " (" : "", mt,
             mt[0] ? ")" : "");
    table_row(&t, "architecture", line);
    json_int_t params = json_integer_value(json_object_get(res, "params_total"));
    if (params >= 1000000000)
        snprintf(line, sizeof line, "%.2f B (%lld)", (double)params / 1e9, (long long)params);
    else
        snprintf(line, sizeof line, "%.2f M (%lld)", (double)params / 1e6, (long long)params);
    table_row(&t, "params", line);
    fmt_bytes((double)json_integer_value(json_object_get(res, "bytes_total")), a, sizeof a);
    snprintf(line, sizeof line, "%s in %lld tensors, %s", a,
             (long long)json_integer_value(json_object_get(res, "tensors")), jstr(res, "format"));
    table_row(&t, "size", line);
    const char *k;
    json_t *v;
    bool first = true;
    json_object_foreach(json_object_get(res, "tensors_by_dtype"), k, v) {
        fmt_bytes((double)json_integer_value(json_object_get(v, "bytes")), a, sizeof a);
        snprintf(line, sizeof line, "%-6s %5lld tensors  %s", k,
                 (long long)json_integer_value(json_object_get(v, "tensors")), a);
        table_row(&t, first ? "dtypes" : "", line);
        first = false;
    }
    json_t *q = json_object_get(res, "quantization");
    const char *method = jstr(q, "method");
    if (method[0]) {
        json_t *bits = json_object_get(q, "bits"), *gs = json_object_get(q, "group_size");
        snprintf(line, sizeof line, "%s", method);
        if (json_is_integer(bits))
            snprintf(line + strlen(line), sizeof line - strlen(line), ", %lld bits",
                     (long long)json_integer_value(bits));
        if (json_is_integer(gs))
            snprintf(line + strlen(line), sizeof line - strlen(line), ", group %lld",
                     (long long)json_integer_value(gs));
    } else {
        snprintf(line, sizeof line, "none");
    }
    table_row(&t, "quantization", line);
    size_t i;
    json_array_foreach(json_object_get(res, "per_tp"), i, v) {
        json_t *bpr = json_object_get(v, "bytes_per_rank");
        snprintf(b, sizeof b, "tp=%lld", (long long)json_integer_value(json_object_get(v, "tp")));
        if (json_is_integer(bpr)) {
            fmt_bytes((double)json_integer_value(bpr), a, sizeof a);
            snprintf(line, sizeof line, "%-6s %s per rank", b, a);
        } else {
            snprintf(line, sizeof line, "%-6s no: %s", b, jstr(v, "code"));
        }
        table_row(&t, i == 0 ? "bytes per TP rank" : "", line);
    }
    json_array_foreach(json_object_get(res, "warnings"), i, v)
        table_row(&t, i == 0 ? "warnings" : "", json_string_value(v));
    table_print(&t, stdout);
    table_free(&t);
}

/* What a finished job made, in a line or a table. */
static void print_result(json_t *job) {
    const char *type = jstr(job, "type");
    json_t *res = json_object_get(job, "result");
    char dur[32], a[64], b[64];
    fmt_job_duration(job, dur, sizeof dur);
    if (!strcmp(type, "inspect")) {
        print_inspection(res, jstr(job, "model"));
        return;
    }
    printf("%s %s in %s", jstr(job, "id"), jstr(job, "state"), dur);
    if (!strcmp(type, "warm_load")) {
        fmt_bytes((double)json_integer_value(json_object_get(res, "bytes")), a, sizeof a);
        fmt_bytes(json_number_value(json_object_get(res, "throughput_bytes_per_s")), b, sizeof b);
        printf(": %s loaded at %s/s, resident %s", a, b, jstr(res, "resident_id"));
    } else if (!strcmp(type, "verify")) {
        printf(": %zu files, %s", json_array_size(json_object_get(res, "files")),
               json_is_true(json_object_get(res, "ok")) ? "all match" : "MISMATCH");
    } else if (!strcmp(type, "prepare")) {
        printf(": %lld ran, %lld skipped",
               (long long)json_integer_value(json_object_get(res, "ran")),
               (long long)json_integer_value(json_object_get(res, "skipped")));
        if (jstr(res, "resident_id")[0]) printf(", resident %s", jstr(res, "resident_id"));
        if (jstr(res, "load_format")[0]) printf(", load_format %s", jstr(res, "load_format"));
    }
    printf("\n");
    if (jstr(res, "next_model")[0]) printf("next model: %s\n", jstr(res, "next_model"));
}

/* The exit status of a finished job, with its error on stderr. A verify
 * that finds a mismatch fails with checksum_mismatch; a server from before
 * that change ended it succeeded with result.ok false, still a failed check. */
static int job_outcome(json_t *job, int status) {
    const char *state = jstr(job, "state");
    if (!strcmp(state, "succeeded")) {
        json_t *res = json_object_get(job, "result");
        if (!strcmp(jstr(job, "type"), "verify") && json_is_false(json_object_get(res, "ok"))) {
            size_t i;
            json_t *f;
            fprintf(stderr, "modelprep: verify_mismatch: %s does not match its hashes\n",
                    jstr(job, "model"));
            json_array_foreach(json_object_get(res, "files"), i, f) {
                if (json_is_false(json_object_get(f, "ok")))
                    fprintf(stderr, "  %s\n", jstr(f, "name"));
            }
            return CLI_EXIT_FAILED;
        }
        return CLI_EXIT_OK;
    }
    if (!strcmp(state, "cancelled")) {
        fprintf(stderr, "modelprep: job %s cancelled\n", jstr(job, "id"));
        return CLI_EXIT_FAILED;
    }
    if (state[0]) {
        json_t *e = json_object_get(job, "error");
        fprintf(stderr, "modelprep: job %s %s: %s: %s\n", jstr(job, "id"), state, jstr(e, "code"),
                jstr(e, "message"));
        return CLI_EXIT_FAILED;
    }
    return status;
}

static int follow_and_report(cli_client *c, opts *o, json_t *job) {
    json_t *final = NULL;
    render_mode mode = o->json ? RENDER_QUIET : isatty(STDOUT_FILENO) ? RENDER_TTY : RENDER_PLAIN;
    int st = follow_job(c, job, mode, &final);
    if (!final) return st;
    if (o->json)
        print_json(final);
    else if (!strcmp(jstr(final, "state"), "succeeded"))
        print_result(final);
    st = job_outcome(final, st);
    json_decref(final);
    return st;
}

static int cmd_job(cli_client *c, opts *o, const char *type) {
    job_req jr = {.cmd = o->args[0], .type = type};
    int st = build_job(c, o, &jr);
    if (st) return st;
    cli_resp r;
    int rc = cli_request(c, "POST", "/v1/jobs", jr.body, &r);
    json_decref(jr.body);
    if (rc != CLI_HTTP_OK || (r.status != 202 && r.status != 200) || !json_is_object(r.doc)) {
        st = api_failure(rc, &r, "submit");
        cli_resp_free(&r);
        return st;
    }
    json_t *job = r.doc;
    if (o->detach) {
        if (o->json)
            print_json(job);
        else
            printf("%s\n", jstr(job, "id"));
        json_decref(job);
        return CLI_EXIT_OK;
    }
    if (!o->json) printf("%s %s %s\n", jstr(job, "id"), type, jstr(job, "model"));
    fflush(stdout);
    return follow_and_report(c, o, job);
}

static int job_path(const char *id, char *out, size_t len) {
    char *e = cli_escape(id);
    if (!e) return -1;
    snprintf(out, len, "/v1/jobs/%s", e);
    free(e);
    return 0;
}

static int cmd_watch(cli_client *c, opts *o) {
    if (o->nargs != 2) return usage_error("watch takes one job id");
    char path[256];
    json_t *job = NULL;
    if (job_path(o->args[1], path, sizeof path) != 0) return CLI_EXIT_FAILED;
    int st = get_doc(c, path, &job);
    if (st) return st;
    return follow_and_report(c, o, job);
}

static int cmd_cancel(cli_client *c, opts *o) {
    if (o->nargs != 2) return usage_error("cancel takes one job id");
    char path[256];
    if (job_path(o->args[1], path, sizeof path) != 0) return CLI_EXIT_FAILED;
    cli_resp r;
    int rc = cli_request(c, "DELETE", path, NULL, &r);
    if (rc != CLI_HTTP_OK || r.status != 202) {
        int st = api_failure(rc, &r, o->args[1]);
        cli_resp_free(&r);
        return st;
    }
    if (o->json)
        print_json(r.doc);
    else
        printf("cancelling %s\n", o->args[1]);
    cli_resp_free(&r);
    return CLI_EXIT_OK;
}

/* --name VALUE options of the list commands, checked against `allowed`. */
static int list_opts(opts *o, const char *const *allowed, json_t *out) {
    for (int i = 1; i < o->nargs; i++) {
        const char *a = o->args[i];
        if (strncmp(a, "--", 2) != 0)
            return usage_error("%s: unexpected argument %s", o->args[0], a);
        const char *eq = strchr(a, '=');
        char key[32];
        snprintf(key, sizeof key, "%.*s", (int)(eq ? eq - a - 2 : (long)strlen(a + 2)), a + 2);
        bool ok = false;
        for (int k = 0; allowed[k]; k++)
            ok |= !strcmp(allowed[k], key);
        if (!ok) return usage_error("%s has no option --%s", o->args[0], key);
        const char *v = eq ? eq + 1 : i + 1 < o->nargs ? o->args[++i] : NULL;
        if (!v) return usage_error("--%s takes a value", key);
        json_object_set_new(out, key, json_string(v));
    }
    return 0;
}

static int cmd_jobs(cli_client *c, opts *o) {
    static const char *const allowed[] = {"state", "type",   "model", "parent",
                                          "limit", "cursor", NULL};
    json_t *q = json_object();
    if (!q) return CLI_EXIT_FAILED;
    int st = list_opts(o, allowed, q);
    char path[2048] = "/v1/jobs";
    const char *k;
    json_t *v;
    size_t n = strlen(path);
    json_object_foreach(q, k, v) {
        char *e = cli_escape(json_string_value(v));
        if (e && n < sizeof path)
            n += (size_t)snprintf(path + n, sizeof path - n, "%c%s=%s", n == 8 ? '?' : '&', k, e);
        free(e);
    }
    json_decref(q);
    if (st) return st;
    if (n >= sizeof path) return usage_error("the filters are too long");
    json_t *doc = NULL;
    if ((st = get_doc(c, path, &doc))) return st;
    if (o->json) {
        print_json(doc);
        json_decref(doc);
        return 0;
    }
    cli_table t;
    table_init(&t, 7, "ID", "TYPE", "STATE", "MODEL", "STARTED", "DURATION", "PROGRESS / ERROR");
    size_t i;
    json_t *j;
    json_array_foreach(json_object_get(doc, "jobs"), i, j) {
        char started[32], dur[32], note[256];
        fmt_clock(json_string_value(json_object_get(j, "started_at")), started, sizeof started);
        fmt_job_duration(j, dur, sizeof dur);
        json_t *e = json_object_get(j, "error"), *p = json_object_get(j, "progress");
        if (json_is_object(e)) {
            snprintf(note, sizeof note, "%s: %.200s", jstr(e, "code"), jstr(e, "message"));
        } else {
            json_int_t d = json_integer_value(json_object_get(p, "done"));
            json_int_t tot = json_integer_value(json_object_get(p, "total"));
            if (tot > 0)
                snprintf(note, sizeof note, "%d%% %.200s", (int)(100.0 * (double)d / (double)tot),
                         jstr(p, "message"));
            else
                snprintf(note, sizeof note, "%.200s", jstr(p, "message"));
        }
        table_row(&t, jstr(j, "id"), jstr(j, "type"), jstr(j, "state"), jstr(j, "model"), started,
                  dur, note);
    }
    table_print(&t, stdout);
    table_free(&t);
    if (jstr(doc, "next_cursor")[0]) printf("(more: --cursor %s)\n", jstr(doc, "next_cursor"));
    json_decref(doc);
    return 0;
}

static int cmd_ls(cli_client *c, opts *o) {
    if (o->nargs != 1) return usage_error("ls takes no arguments");
    json_t *doc = NULL, *res = NULL;
    int st = get_doc(c, "/v1/models", &doc);
    if (st) return st;
    if (o->json) {
        print_json(doc);
        json_decref(doc);
        return 0;
    }
    /* Where each model is resident, from the residents list. */
    if (get_doc(c, "/v1/residents", &res) != 0) res = NULL;
    cli_table t;
    table_init(&t, 7, "MODEL", "KIND", "REVISION", "SIZE", "FORMATS", "INSPECTED", "RESIDENT");
    size_t i, k;
    json_t *m, *r;
    json_array_foreach(json_object_get(doc, "models"), i, m) {
        char size[32], formats[128] = "", insp[128] = "-", where[128] = "";
        fmt_bytes((double)json_integer_value(json_object_get(m, "size_bytes")), size, sizeof size);
        json_t *f;
        json_array_foreach(json_object_get(m, "formats"), k, f) {
            size_t n = strlen(formats);
            snprintf(formats + n, sizeof formats - n, "%s%s", k ? "," : "", json_string_value(f));
        }
        json_t *ir = json_object_get(json_object_get(m, "inspection"), "result");
        if (json_is_object(ir)) {
            json_int_t p = json_integer_value(json_object_get(ir, "params_total"));
            snprintf(insp, sizeof insp, "%s %.2fB", jstr(ir, "architecture"), (double)p / 1e9);
        }
        json_array_foreach(json_object_get(res, "residents"), k, r) {
            if (strcmp(jstr(r, "model"), jstr(m, "model")) || strcmp(jstr(r, "state"), "resident"))
                continue;
            size_t d;
            json_t *dev;
            json_array_foreach(json_object_get(r, "devices"), d, dev) {
                size_t n = strlen(where);
                snprintf(where + n, sizeof where - n, "%s#%lld", n ? "," : "",
                         (long long)json_integer_value(json_object_get(dev, "index")));
            }
        }
        const char *rev = jstr(m, "revision");
        table_row(&t, jstr(m, "model"), jstr(m, "kind"), rev[0] ? rev : "-", size, formats, insp,
                  where[0] ? where : "-");
    }
    table_print(&t, stdout);
    table_free(&t);
    json_decref(res);
    json_decref(doc);
    return 0;
}

static int cmd_ps(cli_client *c, opts *o) {
    if (o->nargs != 1) return usage_error("ps takes no arguments");
    json_t *res = NULL, *devs = NULL;
    int st = get_doc(c, "/v1/residents", &res);
    if (st) return st;
    if (o->json) {
        print_json(res);
        json_decref(res);
        return 0;
    }
    if ((st = get_doc(c, "/v1/devices", &devs))) {
        json_decref(res);
        return st;
    }
    size_t i, k, d;
    json_t *dev, *r, *rd;
    bool any = false;
    json_array_foreach(json_object_get(devs, "devices"), i, dev) {
        json_int_t idx = json_integer_value(json_object_get(dev, "index"));
        char total[32], free_[32], resb[32];
        fmt_bytes((double)json_integer_value(json_object_get(dev, "total_bytes")), total,
                  sizeof total);
        fmt_bytes((double)json_integer_value(json_object_get(dev, "free_bytes")), free_,
                  sizeof free_);
        fmt_bytes((double)json_integer_value(json_object_get(dev, "resident_bytes")), resb,
                  sizeof resb);
        printf("device #%lld %s (%s): %s resident, %s free of %s\n", (long long)idx,
               jstr(dev, "name"), jstr(dev, "kind"), resb, free_, total);
        cli_table t;
        table_init(&t, 5, "  RESIDENT", "MODEL", "ON THIS DEVICE", "TOTAL", "LOADED");
        int rows = 0;
        json_array_foreach(json_object_get(res, "residents"), k, r) {
            if (strcmp(jstr(r, "state"), "resident") != 0) continue;
            json_array_foreach(json_object_get(r, "devices"), d, rd) {
                if (json_integer_value(json_object_get(rd, "index")) != idx) continue;
                char here[32], all[32], at[32], id[64];
                fmt_bytes((double)json_integer_value(json_object_get(rd, "bytes")), here,
                          sizeof here);
                fmt_bytes((double)json_integer_value(json_object_get(r, "bytes")), all, sizeof all);
                fmt_clock(jstr(r, "created_at"), at, sizeof at);
                snprintf(id, sizeof id, "  %s", jstr(r, "id"));
                table_row(&t, id, jstr(r, "model"), here, all, at);
                rows++;
                any = true;
            }
        }
        if (rows)
            table_print(&t, stdout);
        else
            printf("  (nothing resident)\n");
        table_free(&t);
    }
    if (!any && json_array_size(json_object_get(devs, "devices")) == 0) printf("no devices\n");
    json_decref(devs);
    json_decref(res);
    return 0;
}

static int delete_resident(cli_client *c, opts *o, const char *id) {
    char path[256];
    char *e = cli_escape(id);
    if (!e) return CLI_EXIT_FAILED;
    snprintf(path, sizeof path, "/v1/residents/%s%s", e, o->force ? "?force=true" : "");
    free(e);
    cli_resp r;
    int rc = cli_request(c, "DELETE", path, NULL, &r);
    if (rc != CLI_HTTP_OK || r.status != 200) {
        int st = api_failure(rc, &r, id);
        cli_resp_free(&r);
        return st;
    }
    if (o->json)
        print_json(r.doc);
    else
        printf("unloaded %s\n", id);
    cli_resp_free(&r);
    return 0;
}

/* unload r_ID, or every resident of a model. */
static int cmd_unload(cli_client *c, opts *o) {
    if (o->nargs != 2) return usage_error("unload takes one resident id or model");
    const char *what = o->args[1];
    if (!strncmp(what, "r_", 2)) return delete_resident(c, o, what);
    json_t *res = NULL;
    int st = get_doc(c, "/v1/residents", &res);
    if (st) return st;
    size_t i;
    json_t *r;
    int n = 0;
    json_array_foreach(json_object_get(res, "residents"), i, r) {
        if (strcmp(jstr(r, "model"), what) || strcmp(jstr(r, "state"), "resident")) continue;
        n++;
        int s = delete_resident(c, o, jstr(r, "id"));
        if (s && !st) st = s;
    }
    json_decref(res);
    if (!n) {
        fprintf(stderr, "modelprep: nothing of %s is resident\n", what);
        return CLI_EXIT_FAILED;
    }
    return st;
}

static int cmd_rm(cli_client *c, opts *o) {
    if (o->nargs != 2) return usage_error("rm takes one model");
    const char *m = o->args[1];
    const char *slash = strchr(m, '/');
    if (m[0] == '/' || !slash || strchr(slash + 1, '/'))
        return usage_error("rm takes a hub model (org/name); the API does not delete local "
                           "folders");
    char org[256], path[700];
    snprintf(org, sizeof org, "%.*s", (int)(slash - m), m);
    char *eo = cli_escape(org), *en = cli_escape(slash + 1);
    if (!eo || !en) {
        free(eo);
        free(en);
        return CLI_EXIT_FAILED;
    }
    snprintf(path, sizeof path, "/v1/models/%s/%s", eo, en);
    free(eo);
    free(en);
    cli_resp r;
    int rc = cli_request(c, "DELETE", path, NULL, &r);
    if (rc != CLI_HTTP_OK || r.status != 200) {
        int st = api_failure(rc, &r, m);
        cli_resp_free(&r);
        return st;
    }
    if (o->json)
        print_json(r.doc);
    else
        printf("removed %s\n", m);
    cli_resp_free(&r);
    return 0;
}

static int cmd_devices(cli_client *c, opts *o) {
    if (o->nargs != 1) return usage_error("devices takes no arguments");
    json_t *doc = NULL;
    int st = get_doc(c, "/v1/devices", &doc);
    if (st) return st;
    if (o->json) {
        print_json(doc);
        json_decref(doc);
        return 0;
    }
    cli_table t;
    table_init(&t, 7, "DEVICE", "KIND", "NAME", "TOTAL", "FREE", "RESIDENT", "COMPUTE");
    size_t i;
    json_t *d;
    json_array_foreach(json_object_get(doc, "devices"), i, d) {
        char idx[16], tot[32], fr[32], rs[32];
        snprintf(idx, sizeof idx, "#%lld",
                 (long long)json_integer_value(json_object_get(d, "index")));
        fmt_bytes((double)json_integer_value(json_object_get(d, "total_bytes")), tot, sizeof tot);
        fmt_bytes((double)json_integer_value(json_object_get(d, "free_bytes")), fr, sizeof fr);
        fmt_bytes((double)json_integer_value(json_object_get(d, "resident_bytes")), rs, sizeof rs);
        const char *cc = jstr(d, "compute_capability");
        table_row(&t, idx, jstr(d, "kind"), jstr(d, "name"), tot, fr, rs, cc[0] ? cc : "-");
    }
    table_print(&t, stdout);
    table_free(&t);
    if (jstr(doc, "cuda_error")[0]) printf("cuda: %s\n", jstr(doc, "cuda_error"));
    json_decref(doc);
    return 0;
}

/* ---- main ------------------------------------------------------------------------------ */

static char *read_token_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char buf[512];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = 0;
    return strdup(buf);
}

/* Global options may come before or after the command. */
static int parse_globals(int argc, char **argv, opts *o) {
    const char *token_file = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        size_t klen = eq ? (size_t)(eq - a) : strlen(a);
#define IS(name) (klen == strlen(name) && !strncmp(a, name, klen))
        if (IS("--url") || IS("--token-file")) {
            const char *v = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
            if (!v) return usage_error("%.*s takes a value", (int)klen, a);
            if (a[2] == 'u')
                o->url = v;
            else
                token_file = v;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--detach") || !strcmp(a, "-d")) {
            o->detach = true;
        } else if (!strcmp(a, "--force")) {
            o->force = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help") || !strcmp(a, "help")) {
            fputs(USAGE, stdout);
            exit(0);
        } else if (o->nargs < MAX_ARGS) {
            o->args[o->nargs++] = a;
        } else {
            return usage_error("too many arguments");
        }
#undef IS
    }
    if (!o->url) o->url = getenv("MODELPREP_URL");
    if (!o->url || !*o->url) o->url = DEFAULT_URL;
    if (token_file) {
        o->token = read_token_file(token_file);
        if (!o->token) {
            fprintf(stderr, "modelprep: cannot read the token file %s: %s\n", token_file,
                    strerror(errno));
            return CLI_EXIT_USAGE;
        }
    } else if (getenv("MODELPREP_TOKEN")) {
        o->token = strdup(getenv("MODELPREP_TOKEN"));
        if (!o->token) return CLI_EXIT_FAILED;
    }
    if (o->nargs == 0) {
        fputs(USAGE, stderr);
        return CLI_EXIT_USAGE;
    }
    if (strncmp(o->url, "http://", 7) != 0 && strncmp(o->url, "https://", 8) != 0)
        return usage_error("--url must start with http:// or https:// (got %s)", o->url);
    return 0;
}

static const struct {
    const char *cmd, *type;
} JOB_CMDS[] = {
    {"pull", "download"},       {"download", "download"}, {"convert", "convert"},
    {"inspect", "inspect"},     {"shard", "shard"},       {"load", "warm_load"},
    {"warm_load", "warm_load"}, {"prepare", "prepare"},   {"verify", "verify"},
    {"quantize", "quantize"},
};

static const struct {
    const char *cmd;
    int (*fn)(cli_client *, opts *);
} CMDS[] = {
    {"jobs", cmd_jobs}, {"watch", cmd_watch},   {"cancel", cmd_cancel}, {"ls", cmd_ls},
    {"ps", cmd_ps},     {"unload", cmd_unload}, {"rm", cmd_rm},         {"devices", cmd_devices},
};

int main(int argc, char **argv) {
    opts o = {0};
    int st = parse_globals(argc, argv, &o);
    if (st) {
        free(o.token);
        return st;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        free(o.token);
        fprintf(stderr, "modelprep: cannot start libcurl\n");
        return CLI_EXIT_FAILED;
    }
    signal(SIGPIPE, SIG_IGN);
    cli_client c;
    if (cli_client_init(&c, o.url, o.token) != 0) {
        fprintf(stderr, "modelprep: out of memory\n");
        st = CLI_EXIT_FAILED;
        goto out;
    }
    st = -1;
    for (size_t i = 0; st < 0 && i < sizeof JOB_CMDS / sizeof JOB_CMDS[0]; i++)
        if (!strcmp(o.args[0], JOB_CMDS[i].cmd)) st = cmd_job(&c, &o, JOB_CMDS[i].type);
    for (size_t i = 0; st < 0 && i < sizeof CMDS / sizeof CMDS[0]; i++)
        if (!strcmp(o.args[0], CMDS[i].cmd)) st = CMDS[i].fn(&c, &o);
    if (st < 0) st = usage_error("unknown command %s", o.args[0]);
out:
    cli_client_free(&c);
    curl_global_cleanup();
    free(o.token);
    return st;
}
