/*
 * test_api.c - the service end to end: the real modelprepd on an ephemeral
 * port, a real SQLite file, HTTP through libcurl. Covers the contract's
 * conventions (problem+json, auth, limits), jobs (submit, list, paging,
 * get, cancel, idempotency, SSE), persistence across restarts and crash
 * recovery, and the verify job.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/integration/harness.h"

typedef struct fixture {
    char *root;  /* model root */
    char *model; /* root/tiny: a small model dir */
    mp_proc p;
    char root_arg[600];
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    f->root = th_tmpdir();
    char path[700];
    asprintf(&f->model, "%s/tiny", f->root);
    mkdir(f->model, 0755);
    snprintf(path, sizeof path, "%s/config.json", f->model);
    th_write_file(path, "{\"model_type\":\"llama\"}", 22);
    snprintf(path, sizeof path, "%s/weights.bin", f->model);
    th_write_file(path, "0123456789abcdef", 16);
    snprintf(f->root_arg, sizeof f->root_arg, "%s", f->root);
    const char *args[] = {"--model-root", f->root_arg, "--no-access-log", NULL};
    if (th_start(&f->p, NULL, args) != 0) return -1;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    int rc = th_stop(&f->p);
    th_rmdir(f->p.data_dir);
    th_rmdir(f->root);
    free(f->root);
    free(f->model);
    free(f);
    return rc == 0 ? 0 : -1; /* a sanitizer report makes the exit non-zero */
}

static void get_ok(mp_proc *p, const char *path, long want, http_result *r) {
    assert_int_equal(th_http(p, "GET", path, NULL, 0, NULL, r), 0);
    assert_int_equal(r->status, want);
}

static void assert_problem(http_result *r, long status) {
    assert_int_equal(r->status, status);
    assert_non_null(strstr(r->content_type, "application/problem+json"));
    assert_non_null(r->json);
    assert_int_equal(json_integer_value(json_object_get(r->json, "status")), status);
    assert_non_null(json_string_value(json_object_get(r->json, "title")));
    assert_non_null(json_string_value(json_object_get(r->json, "detail")));
    assert_non_null(json_string_value(json_object_get(r->json, "type")));
}

static const char *problem_field(http_result *r) {
    json_t *e = json_array_get(json_object_get(r->json, "errors"), 0);
    return json_string_value(json_object_get(e, "field"));
}

static void post(mp_proc *p, const char *body, http_result *r) {
    assert_int_equal(th_http(p, "POST", "/v1/jobs", body, strlen(body), NULL, r), 0);
}

static char *verify_body(fixture *f) {
    char *b;
    asprintf(&b, "{\"type\":\"verify\",\"model\":\"%s\"}", f->model);
    return b;
}

/* ---- the process ---------------------------------------------------------------- */

static void test_health_ready_version(void **state) {
    fixture *f = *state;
    http_result r;
    get_ok(&f->p, "/healthz", 200, &r);
    assert_string_equal(json_string_value(json_object_get(r.json, "status")), "ok");
    th_result_free(&r);
    get_ok(&f->p, "/readyz", 200, &r);
    assert_string_equal(json_string_value(json_object_get(r.json, "status")), "ready");
    th_result_free(&r);
    get_ok(&f->p, "/v1/version", 200, &r);
    assert_non_null(json_string_value(json_object_get(r.json, "version")));
    assert_non_null(json_string_value(json_object_get(r.json, "git")));
    assert_true(json_is_null(json_object_get(r.json, "cuda"))); /* no GPU here */
    th_result_free(&r);
    get_ok(&f->p, "/v1/devices", 200, &r);
    json_t *d0 = json_array_get(json_object_get(r.json, "devices"), 0);
    assert_string_equal(json_string_value(json_object_get(d0, "kind")), "host");
    assert_true(json_integer_value(json_object_get(d0, "total_bytes")) > 0);
    th_result_free(&r);
    get_ok(&f->p, "/openapi.json", 200, &r);
    assert_non_null(json_object_get(r.json, "paths"));
    th_result_free(&r);
}

static void test_routes_404_405(void **state) {
    fixture *f = *state;
    http_result r;
    get_ok(&f->p, "/nope", 404, &r);
    assert_problem(&r, 404);
    th_result_free(&r);
    assert_int_equal(th_http(&f->p, "PUT", "/v1/jobs", "{}", 2, NULL, &r), 0);
    assert_problem(&r, 405);
    assert_non_null(strstr(r.allow, "GET"));
    assert_non_null(strstr(r.allow, "POST"));
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs/j_doesnotexist", 404, &r);
    assert_problem(&r, 404);
    th_result_free(&r);
}

/* ---- bad input ---------------------------------------------------------------- */

static void expect_400(fixture *f, const char *body, const char *field) {
    http_result r;
    post(&f->p, body, &r);
    assert_problem(&r, 400);
    if (field) {
        const char *got = problem_field(&r);
        if (!got || strcmp(got, field) != 0)
            fail_msg("body %s: expected field %s, got %s (%s)", body, field, got ? got : "none",
                     r.body);
    }
    th_result_free(&r);
}

static void test_bad_requests(void **state) {
    fixture *f = *state;
    char body[2048];
    expect_400(f, "{not json", NULL);
    expect_400(f, "[1,2]", NULL);
    expect_400(f, "{\"type\":\"verify\",\"type\":\"verify\",\"model\":\"a/b\"}", NULL);
    expect_400(f, "{\"type\":7,\"model\":\"a/b\"}", "type");
    expect_400(f, "{\"model\":\"a/b\"}", "type");
    expect_400(f, "{\"type\":\"explode\",\"model\":\"a/b\"}", "type");
    expect_400(f, "{\"type\":\"verify\"}", "model");
    expect_400(f, "{\"type\":\"verify\",\"model\":[]}", "model");
    expect_400(f, "{\"type\":\"verify\",\"model\":\"a/b\",\"colour\":1}", "colour");
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s\",\"params\":{\"x\":1}}",
             f->model);
    expect_400(f, body, "params.x");
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s\",\"params\":[]}", f->model);
    expect_400(f, body, "params");
    expect_400(f, "{\"type\":\"verify\",\"model\":\"a/b\",\"revision\":\"../x\"}", "revision");
    /* paths: traversal, NUL, outside the roots, relative, too long, missing */
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s/../..\"}", f->model);
    expect_400(f, body, "model");
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s\\u0000x\"}", f->model);
    expect_400(f, body, "model");
    expect_400(f, "{\"type\":\"verify\",\"model\":\"/etc\"}", "model");
    expect_400(f, "{\"type\":\"verify\",\"model\":\"tiny\"}", "model");
    expect_400(f, "{\"type\":\"verify\",\"model\":\"a/b/c\"}", "model");
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s/missing\"}", f->root);
    expect_400(f, body, "model");
    char *longp = malloc(5000);
    memset(longp, 'a', 4999);
    longp[4999] = 0;
    char *lb;
    asprintf(&lb, "{\"type\":\"verify\",\"model\":\"/%s\"}", longp);
    expect_400(f, lb, "model");
    free(lb);
    free(longp);
    /* a symlink inside the root that points outside it */
    char link[700];
    snprintf(link, sizeof link, "%s/escape", f->root);
    assert_int_equal(symlink("/etc", link), 0);
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s\"}", link);
    expect_400(f, body, "model");
    /* a hub model that is not cached */
    expect_400(f, "{\"type\":\"verify\",\"model\":\"org/not-cached\"}", "model");
}

static void test_body_too_large(void **state) {
    fixture *f = *state;
    size_t n = (1u << 20) + 10;
    char *big = malloc(n + 1);
    memset(big, ' ', n);
    big[0] = '{';
    big[n - 1] = '}';
    big[n] = 0;
    http_result r;
    assert_int_equal(th_http(&f->p, "POST", "/v1/jobs", big, n, NULL, &r), 0);
    assert_problem(&r, 413);
    th_result_free(&r);
    free(big);
    /* the server is still fine */
    get_ok(&f->p, "/healthz", 200, &r);
    th_result_free(&r);
}

/* ---- jobs ---------------------------------------------------------------- */

static void test_verify_records_then_detects_tamper(void **state) {
    fixture *f = *state;
    char *body = verify_body(f);
    http_result r;
    post(&f->p, body, &r);
    assert_int_equal(r.status, 202);
    assert_string_equal(r.content_type, "application/json");
    const char *id = json_string_value(json_object_get(r.json, "id"));
    char want_loc[128];
    snprintf(want_loc, sizeof want_loc, "/v1/jobs/%s", id);
    assert_string_equal(r.location, want_loc);
    assert_string_equal(json_string_value(json_object_get(r.json, "state")), "queued");
    assert_string_equal(json_string_value(json_object_get(r.json, "revision")), "main");
    json_t *job = th_wait_job(&f->p, id, 30);
    th_result_free(&r);
    assert_non_null(job);
    assert_string_equal(json_string_value(json_object_get(job, "state")), "succeeded");
    json_t *res = json_object_get(job, "result");
    assert_true(json_is_true(json_object_get(res, "ok")));
    /* nothing was known before: this run only recorded the hashes */
    assert_string_equal(json_string_value(json_object_get(res, "status")), "recorded");
    json_t *files = json_object_get(res, "files");
    assert_int_equal(json_array_size(files), 2);
    /* sorted by name: config.json, weights.bin; sha256("0123456789abcdef") */
    json_t *w = json_array_get(files, 1);
    assert_string_equal(json_string_value(json_object_get(w, "name")), "weights.bin");
    assert_string_equal(json_string_value(json_object_get(w, "actual")),
                        "9f9f5111f7b27a781f1f1ddde5ebc2dd2b796bfc7365c9c28b548e564176929f");
    json_t *prog = json_object_get(job, "progress");
    assert_int_equal(json_integer_value(json_object_get(prog, "done")), 38);
    assert_int_equal(json_integer_value(json_object_get(prog, "total")), 38);
    /* the final progress: how it ended and the average rate, no job id */
    assert_string_equal(json_string_value(json_object_get(prog, "message")), "done");
    assert_true(json_number_value(json_object_get(prog, "rate")) > 0);
    assert_null(json_object_get(prog, "id"));
    assert_non_null(json_string_value(json_object_get(job, "finished_at")));
    json_decref(job);

    /* change a byte: the second run compares against the recorded hash */
    char path[700];
    snprintf(path, sizeof path, "%s/weights.bin", f->model);
    th_write_file(path, "0123456789abcdeX", 16);
    char *id2 = th_submit(&f->p, body);
    job = th_wait_job(&f->p, id2, 30);
    /* a mismatch fails the job, names the file, and keeps the table */
    assert_string_equal(json_string_value(json_object_get(job, "state")), "failed");
    json_t *jerr = json_object_get(job, "error");
    assert_string_equal(json_string_value(json_object_get(jerr, "code")), "checksum_mismatch");
    assert_non_null(strstr(json_string_value(json_object_get(jerr, "message")), "weights.bin"));
    assert_null(strstr(json_string_value(json_object_get(jerr, "message")), "config.json"));
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(job, "progress"), "message")), "failed");
    res = json_object_get(job, "result");
    assert_true(json_is_false(json_object_get(res, "ok")));
    assert_string_equal(json_string_value(json_object_get(res, "status")), "verified");
    w = json_array_get(json_object_get(res, "files"), 1);
    assert_true(json_is_false(json_object_get(w, "ok")));
    assert_string_equal(json_string_value(json_object_get(w, "status")), "verified");
    assert_string_not_equal(json_string_value(json_object_get(w, "expected")),
                            json_string_value(json_object_get(w, "actual")));
    json_decref(job);
    th_write_file(path, "0123456789abcdef", 16);
    free(id2);
    free(body);
}

static void test_list_filters_and_paging(void **state) {
    fixture *f = *state;
    char *body = verify_body(f);
    char *ids[5];
    for (int i = 0; i < 5; i++)
        ids[i] = th_submit(&f->p, body);
    for (int i = 0; i < 5; i++)
        json_decref(th_wait_job(&f->p, ids[i], 30));
    http_result r;
    get_ok(&f->p, "/v1/jobs?limit=2&type=verify", 200, &r);
    json_t *jobs = json_object_get(r.json, "jobs");
    assert_int_equal(json_array_size(jobs), 2);
    /* newest first */
    assert_string_equal(json_string_value(json_object_get(json_array_get(jobs, 0), "id")), ids[4]);
    assert_string_equal(json_string_value(json_object_get(json_array_get(jobs, 1), "id")), ids[3]);
    const char *cursor = json_string_value(json_object_get(r.json, "next_cursor"));
    assert_non_null(cursor);
    char path[256];
    snprintf(path, sizeof path, "/v1/jobs?limit=2&cursor=%s", cursor);
    th_result_free(&r);
    get_ok(&f->p, path, 200, &r);
    jobs = json_object_get(r.json, "jobs");
    assert_string_equal(json_string_value(json_object_get(json_array_get(jobs, 0), "id")), ids[2]);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?state=succeeded&limit=500", 200, &r);
    size_t i;
    json_t *it;
    json_array_foreach(json_object_get(r.json, "jobs"), i, it)
        assert_string_equal(json_string_value(json_object_get(it, "state")), "succeeded");
    assert_true(json_array_size(json_object_get(r.json, "jobs")) >= 5);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?state=running", 200, &r);
    assert_int_equal(json_array_size(json_object_get(r.json, "jobs")), 0);
    assert_true(json_is_null(json_object_get(r.json, "next_cursor")));
    th_result_free(&r);
    snprintf(path, sizeof path, "/v1/jobs?model=%s", "nobody/none");
    get_ok(&f->p, path, 200, &r);
    assert_int_equal(json_array_size(json_object_get(r.json, "jobs")), 0);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?limit=501", 400, &r);
    assert_problem(&r, 400);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?limit=abc", 400, &r);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?state=bogus", 400, &r);
    th_result_free(&r);
    get_ok(&f->p, "/v1/jobs?cursor=xyz", 400, &r);
    th_result_free(&r);
    for (int k = 0; k < 5; k++)
        free(ids[k]);
    free(body);
}

static void test_idempotency(void **state) {
    fixture *f = *state;
    char *body = verify_body(f);
    const char *hdr[] = {"Idempotency-Key: key-123", NULL};
    http_result a, b, c;
    assert_int_equal(th_http(&f->p, "POST", "/v1/jobs", body, strlen(body), hdr, &a), 0);
    assert_int_equal(a.status, 202);
    assert_int_equal(th_http(&f->p, "POST", "/v1/jobs", body, strlen(body), hdr, &b), 0);
    assert_int_equal(b.status, 200);
    assert_string_equal(json_string_value(json_object_get(a.json, "id")),
                        json_string_value(json_object_get(b.json, "id")));
    const char *other = "{\"type\":\"verify\",\"model\":\"org/other\"}";
    assert_int_equal(th_http(&f->p, "POST", "/v1/jobs", other, strlen(other), hdr, &c), 0);
    /* same key, different request */
    assert_true(c.status == 422 || c.status == 400);
    assert_problem(&c, c.status);
    json_decref(th_wait_job(&f->p, json_string_value(json_object_get(a.json, "id")), 30));
    th_result_free(&a);
    th_result_free(&b);
    th_result_free(&c);
    free(body);
}

/* A model big enough that verify runs for a while (sparse, so cheap on disk). */
static char *big_model(fixture *f, const char *name, long long bytes) {
    char *dir;
    asprintf(&dir, "%s/%s", f->root, name);
    mkdir(dir, 0755);
    char path[800];
    snprintf(path, sizeof path, "%s/big.bin", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, bytes), 0);
    close(fd);
    return dir;
}

static void test_cancel_running_and_queued(void **state) {
    fixture *f = *state;
    char *dir = big_model(f, "big1", 4LL << 30);
    char body[1024];
    snprintf(body, sizeof body, "{\"type\":\"verify\",\"model\":\"%s\"}", dir);
    /* two workers: two long jobs occupy them, the third waits queued */
    char *a = th_submit(&f->p, body), *b = th_submit(&f->p, body), *c = th_submit(&f->p, body);
    json_decref(th_wait_state(&f->p, a, "running", 30));
    char path[128];
    http_result r;
    snprintf(path, sizeof path, "/v1/jobs/%s", c);
    assert_int_equal(th_http(&f->p, "DELETE", path, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.status, 202);
    th_result_free(&r);
    json_t *jc = th_wait_job(&f->p, c, 30);
    assert_string_equal(json_string_value(json_object_get(jc, "state")), "cancelled");
    assert_true(json_is_null(json_object_get(jc, "started_at")));
    json_decref(jc);
    const char *ids[] = {a, b};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "/v1/jobs/%s", ids[i]);
        assert_int_equal(th_http(&f->p, "DELETE", path, NULL, 0, NULL, &r), 0);
        assert_int_equal(r.status, 202);
        th_result_free(&r);
        json_t *j = th_wait_job(&f->p, ids[i], 30);
        assert_string_equal(json_string_value(json_object_get(j, "state")), "cancelled");
        assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                            "cancelled");
        json_decref(j);
        /* cancelling an ended job is a conflict */
        assert_int_equal(th_http(&f->p, "DELETE", path, NULL, 0, NULL, &r), 0);
        assert_problem(&r, 409);
        th_result_free(&r);
    }
    assert_int_equal(th_http(&f->p, "DELETE", "/v1/jobs/j_nope", NULL, 0, NULL, &r), 0);
    assert_problem(&r, 404);
    th_result_free(&r);
    free(a);
    free(b);
    free(c);
    th_rmdir(dir);
    free(dir);
}

static void test_sse_job_events(void **state) {
    fixture *f = *state;
    char *body = verify_body(f);
    char *id = th_submit(&f->p, body);
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s/events", id);
    http_result r;
    /* The stream ends by itself after the terminal state event. */
    assert_int_equal(th_http(&f->p, "GET", path, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.content_type, "text/event-stream"));
    assert_non_null(strstr(r.body, "event: state"));
    assert_non_null(strstr(r.body, "event: progress"));
    assert_non_null(strstr(r.body, "\"state\":\"succeeded\""));
    /* queued comes before succeeded */
    assert_true(strstr(r.body, "\"state\":\"queued\"") < strstr(r.body, "\"state\":\"succeeded\""));
    th_result_free(&r);
    /* a stream opened after the end replays the history and ends */
    assert_int_equal(th_http(&f->p, "GET", path, NULL, 0, NULL, &r), 0);
    assert_non_null(strstr(r.body, "\"state\":\"succeeded\""));
    th_result_free(&r);
    assert_int_equal(th_http(&f->p, "GET", "/v1/jobs/j_nope/events", NULL, 0, NULL, &r), 0);
    assert_problem(&r, 404);
    th_result_free(&r);
    free(id);
    free(body);
}

/* ---- persistence, crash recovery, drain ------------------------------------ */

static void test_restart_keeps_jobs_and_crash_fails_running(void **state) {
    fixture *f = *state;
    char *body = verify_body(f);
    char *done = th_submit(&f->p, body);
    json_decref(th_wait_job(&f->p, done, 30));
    char *dir = big_model(f, "big2", 8LL << 30);
    char big[1024];
    snprintf(big, sizeof big, "{\"type\":\"verify\",\"model\":\"%s\"}", dir);
    char *running = th_submit(&f->p, big);
    json_decref(th_wait_state(&f->p, running, "running", 30));
    th_kill9(&f->p);

    const char *args[] = {"--model-root", f->root_arg, "--no-access-log", NULL};
    assert_int_equal(th_start(&f->p, f->p.data_dir, args), 0);
    char path[128];
    http_result r;
    snprintf(path, sizeof path, "/v1/jobs/%s", done);
    get_ok(&f->p, path, 200, &r);
    assert_string_equal(json_string_value(json_object_get(r.json, "state")), "succeeded");
    th_result_free(&r);
    snprintf(path, sizeof path, "/v1/jobs/%s", running);
    get_ok(&f->p, path, 200, &r);
    assert_string_equal(json_string_value(json_object_get(r.json, "state")), "failed");
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(r.json, "error"), "code")),
        "interrupted");
    th_result_free(&r);

    /* SIGTERM while a job runs: it is interrupted, the exit is clean */
    char *again = th_submit(&f->p, big);
    json_decref(th_wait_state(&f->p, again, "running", 30));
    assert_int_equal(th_stop(&f->p), 0);
    assert_int_equal(th_start(&f->p, f->p.data_dir, args), 0);
    snprintf(path, sizeof path, "/v1/jobs/%s", again);
    get_ok(&f->p, path, 200, &r);
    assert_string_equal(json_string_value(json_object_get(r.json, "state")), "failed");
    th_result_free(&r);
    free(again);
    free(done);
    free(running);
    free(body);
    th_rmdir(dir);
    free(dir);
}

/* ---- auth and listening ------------------------------------------------------ */

static void test_auth(void **state) {
    (void)state;
    char *dir = th_tmpdir();
    char tokfile[600];
    snprintf(tokfile, sizeof tokfile, "%s/token", dir);
    th_write_file(tokfile, "s3cret-token\n", 13);
    mp_proc p = {0};
    const char *args[] = {"--token-file", tokfile, NULL};
    assert_int_equal(th_start(&p, NULL, args), 0);
    http_result r;
    get_ok(&p, "/healthz", 200, &r);
    th_result_free(&r);
    get_ok(&p, "/readyz", 200, &r);
    th_result_free(&r);
    get_ok(&p, "/v1/jobs", 401, &r);
    assert_problem(&r, 401);
    th_result_free(&r);
    get_ok(&p, "/metrics", 401, &r);
    th_result_free(&r);
    snprintf(p.token, sizeof p.token, "wrong");
    get_ok(&p, "/v1/jobs", 401, &r);
    th_result_free(&r);
    snprintf(p.token, sizeof p.token, "s3cret-token");
    get_ok(&p, "/v1/jobs", 200, &r);
    th_result_free(&r);
    get_ok(&p, "/metrics", 200, &r);
    assert_non_null(strstr(r.body, "modelprep_http_requests_total"));
    th_result_free(&r);
    assert_int_equal(th_stop(&p), 0);
    th_rmdir(p.data_dir);

    /* MODELPREP_TOKEN works too */
    const char *env[] = {"MODELPREP_TOKEN=envtok", NULL};
    mp_proc q = {0};
    assert_int_equal(th_start_env(&q, NULL, NULL, env), 0);
    get_ok(&q, "/v1/version", 401, &r);
    th_result_free(&r);
    snprintf(q.token, sizeof q.token, "envtok");
    get_ok(&q, "/v1/version", 200, &r);
    th_result_free(&r);
    assert_int_equal(th_stop(&q), 0);
    th_rmdir(q.data_dir);

    /* no token + a non-loopback address: refuse to start */
    char data[700];
    snprintf(data, sizeof data, "%s/d", dir);
    const char *bad[] = {"--listen", "0.0.0.0:0", "--data-dir", data, NULL};
    assert_int_not_equal(th_run_expect_exit(bad, NULL), 0);
    const char *badflag[] = {"--workers", "zero", "--data-dir", data, NULL};
    assert_int_equal(th_run_expect_exit(badflag, NULL), 2);
    th_rmdir(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest with_server[] = {
        cmocka_unit_test(test_health_ready_version),
        cmocka_unit_test(test_routes_404_405),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_body_too_large),
        cmocka_unit_test(test_verify_records_then_detects_tamper),
        cmocka_unit_test(test_list_filters_and_paging),
        cmocka_unit_test(test_idempotency),
        cmocka_unit_test(test_cancel_running_and_queued),
        cmocka_unit_test(test_sse_job_events),
        cmocka_unit_test(test_restart_keeps_jobs_and_crash_fails_running),
    };
    const struct CMUnitTest standalone[] = {
        cmocka_unit_test(test_auth),
    };
    int failed = cmocka_run_group_tests_name("api", with_server, setup, teardown);
    failed += cmocka_run_group_tests_name("auth", standalone, NULL, NULL);
    return failed ? 1 : 0;
}
