/*
 * test_metrics.c - the metrics registry on its own (a server with nothing
 * but metrics): label escaping, cumulative histogram buckets, the byte
 * counters taken from job results, and the exposition's shape. The whole
 * output against a real parser and promtool is tests/py/test_metrics.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handlers/handlers.h"
#include "server/context.h"
#include "server/metrics.h"
#include "util/sbuf.h"

static char *render(mp_metrics *m) {
    mp_server srv;
    memset(&srv, 0, sizeof srv);
    srv.metrics = m;
    sbuf out = {0};
    h_metrics_render(&srv, &out);
    size_t len;
    char *text = sb_take(&out, &len);
    assert_non_null(text);
    assert_int_equal(strlen(text), len);
    return text;
}

/* The value of the line that starts with `series` followed by a space. */
static double value_of(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ') return strtod(p + n + 1, NULL);
    }
    fail_msg("no series %s in:\n%s", series, text);
    return -1;
}

static void test_label_escape(void **state) {
    (void)state;
    sbuf out = {0};
    metrics_label_escape(&out, "a\"b\\c\nd");
    metrics_label_escape(&out, "");
    metrics_label_escape(&out, "plain/org-name_1.5");
    size_t len;
    char *s = sb_take(&out, &len);
    assert_string_equal(s, "a\\\"b\\\\c\\ndplain/org-name_1.5");
    free(s);
}

static void test_http_histogram_cumulative(void **state) {
    (void)state;
    mp_metrics *m = metrics_new();
    assert_non_null(m);
    metrics_http(m, "jobs_get", 200, 0.0002);
    metrics_http(m, "jobs_get", 200, 0.003);
    metrics_http(m, "jobs_get", 404, 0.2);
    metrics_http(m, "jobs_get", 200, 9.0); /* over the last bound: only +Inf */
    char *t = render(m);
    assert_int_equal(
        value_of(t, "modelprep_http_requests_total{route=\"jobs_get\",status=\"200\"}"), 3);
    assert_int_equal(
        value_of(t, "modelprep_http_requests_total{route=\"jobs_get\",status=\"404\"}"), 1);
    const char *b = "modelprep_http_request_duration_seconds_bucket{route=\"jobs_get\",le=";
    char key[200];
    snprintf(key, sizeof key, "%s\"0.0005\"}", b);
    assert_int_equal(value_of(t, key), 1);
    snprintf(key, sizeof key, "%s\"0.005\"}", b);
    assert_int_equal(value_of(t, key), 2);
    snprintf(key, sizeof key, "%s\"0.25\"}", b);
    assert_int_equal(value_of(t, key), 3);
    snprintf(key, sizeof key, "%s\"5\"}", b);
    assert_int_equal(value_of(t, key), 3);
    snprintf(key, sizeof key, "%s\"+Inf\"}", b);
    assert_int_equal(value_of(t, key), 4);
    assert_int_equal(
        value_of(t, "modelprep_http_request_duration_seconds_count{route=\"jobs_get\"}"), 4);
    double sum = value_of(t, "modelprep_http_request_duration_seconds_sum{route=\"jobs_get\"}");
    assert_true(sum > 9.2 && sum < 9.21);
    free(t);
    metrics_free(m);
}

static void test_job_results_feed_byte_counters(void **state) {
    (void)state;
    mp_metrics *m = metrics_new();
    json_t *dl =
        json_pack("{s:I,s:I}", "bytes_downloaded", (json_int_t)1000, "bytes_reused", (json_int_t)5);
    json_t *wl = json_pack("{s:I,s:f}", "bytes", (json_int_t)4096, "throughput_bytes_per_s", 2.5e9);
    json_t *vf = json_pack("{s:b,s:I}", "ok", 1, "bytes", (json_int_t)77);
    json_t *sh =
        json_pack("{s:[{s:I},{s:I}]}", "ranks", "bytes", (json_int_t)10, "bytes", (json_int_t)20);
    metrics_job_done(m, "download", "succeeded", 1.0, dl);
    metrics_job_done(m, "warm_load", "succeeded", 0.5, wl);
    metrics_job_done(m, "verify", "succeeded", 0.02, vf);
    metrics_job_done(m, "verify", "failed", 0.01, vf); /* failed jobs move no bytes */
    metrics_job_done(m, "shard", "succeeded", 3.0, sh);
    metrics_job_done(m, "verify", "succeeded", 0.1, NULL);
    metrics_bytes(m, "downloaded", 24);
    char *t = render(m);
    assert_int_equal(value_of(t, "modelprep_downloaded_bytes_total"), 1024);
    assert_int_equal(value_of(t, "modelprep_read_bytes_total"), 4096 + 77 + 30);
    assert_int_equal(value_of(t, "modelprep_copied_bytes_total"), 4096);
    assert_true(value_of(t, "modelprep_load_throughput_bytes_per_second") == 2.5e9);
    /* verify is a registered type: its counters and histogram are there. */
    assert_int_equal(
        value_of(t, "modelprep_jobs_finished_total{type=\"verify\",state=\"succeeded\"}"), 2);
    assert_int_equal(value_of(t, "modelprep_jobs_finished_total{type=\"verify\",state=\"failed\"}"),
                     1);
    assert_int_equal(
        value_of(t, "modelprep_jobs_finished_total{type=\"verify\",state=\"cancelled\"}"), 0);
    assert_int_equal(value_of(t, "modelprep_job_duration_seconds_count{type=\"verify\"}"), 3);
    assert_int_equal(
        value_of(t, "modelprep_job_duration_seconds_bucket{type=\"verify\",le=\"0.01\"}"), 1);
    assert_int_equal(
        value_of(t, "modelprep_job_duration_seconds_bucket{type=\"verify\",le=\"0.05\"}"), 2);
    /* Every registered type x state is a jobs series even with no store. */
    assert_int_equal(value_of(t, "modelprep_jobs{type=\"verify\",state=\"queued\"}"), 0);
    free(t);
    json_decref(dl);
    json_decref(wl);
    json_decref(vf);
    json_decref(sh);
    metrics_free(m);
}

/* Every family is announced once by HELP and TYPE before its samples, and
 * every sample line is `name[{labels}] value`. */
static void test_exposition_shape(void **state) {
    (void)state;
    mp_metrics *m = metrics_new();
    metrics_http(m, "healthz", 200, 0.001);
    char *t = render(m);
    assert_int_equal(t[strlen(t) - 1], '\n');
    int types = 0, helps = 0, samples = 0;
    char *save = NULL;
    for (char *line = strtok_r(t, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# TYPE modelprep_", 17) == 0)
            types++;
        else if (strncmp(line, "# HELP modelprep_", 17) == 0)
            helps++;
        else {
            assert_int_equal(strncmp(line, "modelprep_", 10), 0);
            const char *sp = strrchr(line, ' ');
            assert_non_null(sp);
            char *end;
            strtod(sp + 1, &end);
            assert_int_equal(*end, 0);
            samples++;
        }
    }
    assert_int_equal(types, helps);
    assert_true(types >= 18);
    assert_true(samples > types);
    free(t);
    metrics_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_label_escape),
        cmocka_unit_test(test_http_histogram_cumulative),
        cmocka_unit_test(test_job_results_feed_byte_counters),
        cmocka_unit_test(test_exposition_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
