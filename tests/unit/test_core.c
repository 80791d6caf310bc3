/*
 * test_core.c - unit tests of the service's pure parts: the router and its
 * agreement with the OpenAPI document, param validation, model-path
 * confinement, problem+json, and the store (migrations, jobs, claims,
 * idempotency, paging, recovery) on a real SQLite file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/models/models.h"
#include "server/http.h"
#include "loader/jobs/jobs.h"
#include "server/jobs.h"
#include "server/params.h"
#include "handlers/handlers.h"
#include "server/router.h"
#include "store/store.h"
#include "util/assets.h"
#include "util/sbuf.h"

/* ---- router ---------------------------------------------------------------- */

static void dummy_handler(http_req *rq, http_resp *rs) {
    (void)rq;
    (void)rs;
}

static void test_router_match(void **state) {
    (void)state;
    const route *r = NULL;
    const char *params[HTTP_MAX_PARAMS];
    int np = 0;
    char buf[256], allow[64];
    assert_int_equal(router_match(h_routes, "GET", "/v1/jobs/j_1/events", &r, params, &np, buf,
                                  sizeof buf, allow, sizeof allow),
                     ROUTE_FOUND);
    assert_string_equal(r->pattern, "/v1/jobs/{id}/events");
    assert_int_equal(np, 1);
    assert_string_equal(params[0], "j_1");
    assert_int_equal(router_match(h_routes, "GET", "/v1/jobs/", &r, params, &np, buf, sizeof buf,
                                  allow, sizeof allow),
                     ROUTE_NO_PATH);
    assert_int_equal(router_match(h_routes, "GET", "/v1/jobs/a/b/c", &r, params, &np, buf,
                                  sizeof buf, allow, sizeof allow),
                     ROUTE_NO_PATH);
    assert_int_equal(router_match(h_routes, "PATCH", "/v1/jobs", &r, params, &np, buf, sizeof buf,
                                  allow, sizeof allow),
                     ROUTE_NO_METHOD);
    assert_non_null(strstr(allow, "POST"));
    assert_non_null(strstr(allow, "GET"));
    assert_int_equal(
        router_match(h_routes, "GET", "", &r, params, &np, buf, sizeof buf, allow, sizeof allow),
        ROUTE_NO_PATH);
    (void)dummy_handler;
}

/* Every route is in openapi/openapi.yaml and every documented operation is
 * routed: the document cannot drift from the server. */
static void test_openapi_matches_routes(void **state) {
    (void)state;
    const mp_asset *a = mp_asset_find("openapi.yaml");
    assert_non_null(a);
    json_error_t jerr;
    json_t *doc = json_loadb((const char *)a->data, a->size, 0, &jerr);
    assert_non_null(doc);
    json_t *paths = json_object_get(doc, "paths");
    assert_true(json_is_object(paths));
    int routed = 0;
    for (const route *r = h_routes; r->method; r++) {
        char method[16];
        size_t i = 0;
        for (; r->method[i] && i < sizeof method - 1; i++)
            method[i] = (char)(r->method[i] | 0x20);
        method[i] = 0;
        json_t *item = json_object_get(paths, r->pattern);
        if (!item || !json_object_get(item, method))
            fail_msg("route %s %s is not in openapi.yaml", r->method, r->pattern);
        routed++;
    }
    const char *path;
    json_t *item;
    int documented = 0;
    json_object_foreach(paths, path, item) {
        const char *method;
        json_t *o;
        json_object_foreach(item, method, o) {
            if (strcmp(method, "parameters") == 0) continue;
            documented++;
            bool found = false;
            for (const route *r = h_routes; r->method; r++)
                if (strcasecmp(r->method, method) == 0 && strcmp(r->pattern, path) == 0)
                    found = true;
            if (!found) fail_msg("openapi.yaml documents %s %s, which is not routed", method, path);
        }
    }
    assert_int_equal(routed, documented);
    json_decref(doc);
}

/* Each job type's params are documented as components.schemas.Params_<type>
 * with the same names, JSON types, enum values and integer bounds as its
 * mp_param_spec, and JobRequest_<type> ties the type to those params. */
static const char *kind_json_type(mp_param_kind k) {
    switch (k) {
    case MP_P_STRING:
        return "string";
    case MP_P_INT:
        return "integer";
    case MP_P_NUMBER:
        return "number";
    case MP_P_BOOL:
        return "boolean";
    case MP_P_STRING_ARRAY:
    case MP_P_INT_ARRAY:
        return "array";
    case MP_P_OBJECT:
        return "object";
    }
    return "?";
}

static void test_openapi_job_params(void **state) {
    (void)state;
    const mp_asset *a = mp_asset_find("openapi.yaml");
    json_t *doc = json_loadb((const char *)a->data, a->size, 0, NULL);
    assert_non_null(doc);
    json_t *schemas = json_object_get(json_object_get(doc, "components"), "schemas");
    size_t ntypes = 0;
    for (const mp_job_type *const *jt = job_types_all(); *jt; jt++) {
        char name[64];
        snprintf(name, sizeof name, "Params_%s", (*jt)->name);
        json_t *props = json_object_get(json_object_get(schemas, name), "properties");
        if (!props) fail_msg("openapi.yaml has no %s", name);
        size_t nspec = 0;
        for (const mp_param_spec *p = (*jt)->params; p->name; p++, nspec++) {
            json_t *prop = json_object_get(props, p->name);
            if (!prop) fail_msg("%s lacks param %s", name, p->name);
            const char *want = kind_json_type(p->kind);
            const char *got = json_string_value(json_object_get(prop, "type"));
            if (!got || strcmp(got, want) != 0)
                fail_msg("%s.%s: type %s, spec says %s", name, p->name, got ? got : "none", want);
            if (p->kind == MP_P_STRING_ARRAY || p->kind == MP_P_INT_ARRAY) {
                const char *it =
                    json_string_value(json_object_get(json_object_get(prop, "items"), "type"));
                assert_non_null(it);
                assert_string_equal(it, p->kind == MP_P_INT_ARRAY ? "integer" : "string");
            }
            /* integer bounds: the same range the server enforces */
            json_t *bounds = p->kind == MP_P_INT_ARRAY ? json_object_get(prop, "items")
                             : p->kind == MP_P_INT     ? prop
                                                       : NULL;
            if (bounds && (p->min || p->max)) {
                json_t *lo = json_object_get(bounds, "minimum"),
                       *hi = json_object_get(bounds, "maximum");
                if (!json_is_integer(lo) || json_integer_value(lo) != p->min)
                    fail_msg("%s.%s: minimum is not %lld", name, p->name, (long long)p->min);
                if (!json_is_integer(hi) || json_integer_value(hi) != p->max)
                    fail_msg("%s.%s: maximum is not %lld", name, p->name, (long long)p->max);
            }
            json_t *en = json_object_get(prop, "enum");
            if (p->enum_values) {
                if (!en) fail_msg("%s.%s: enum missing", name, p->name);
                size_t n = 0;
                for (const char *const *e = p->enum_values; *e; e++, n++) {
                    bool found = false;
                    size_t i;
                    json_t *v;
                    json_array_foreach(en, i, v) if (strcmp(json_string_value(v), *e) == 0) found =
                        true;
                    if (!found) fail_msg("%s.%s: enum lacks %s", name, p->name, *e);
                }
                if (json_array_size(en) != n)
                    fail_msg("%s.%s: enum has extra values", name, p->name);
            } else if (en) {
                fail_msg("%s.%s: documented enum, spec has none", name, p->name);
            }
        }
        if (json_object_size(props) != nspec)
            fail_msg("%s documents %zu params, the spec has %zu", name, json_object_size(props),
                     nspec);
        /* the request variant of this type takes exactly these params */
        snprintf(name, sizeof name, "JobRequest_%s", (*jt)->name);
        json_t *rq = json_object_get(json_object_get(schemas, name), "properties");
        if (!rq) fail_msg("openapi.yaml has no %s", name);
        json_t *ten = json_object_get(json_object_get(rq, "type"), "enum");
        assert_int_equal(json_array_size(ten), 1);
        assert_string_equal(json_string_value(json_array_get(ten, 0)), (*jt)->name);
        char want_ref[96];
        snprintf(want_ref, sizeof want_ref, "#/components/schemas/Params_%s", (*jt)->name);
        assert_string_equal(
            json_string_value(json_object_get(json_object_get(rq, "params"), "$ref")), want_ref);
        ntypes++;
    }
    /* JobRequest is one of the variants, one per registered type */
    json_t *one = json_object_get(json_object_get(schemas, "JobRequest"), "oneOf");
    assert_int_equal(json_array_size(one), ntypes);
    json_decref(doc);
}

/* ---- problem+json ------------------------------------------------------------ */

static void test_problem_json(void **state) {
    (void)state;
    http_resp rs = {0};
    mp_error err = {0};
    mp_err_field(&err, "params.tp_size", "out_of_range", "tp_size must be in 1..8");
    resp_error(&rs, 400, &err);
    assert_int_equal(rs.status, 400);
    assert_string_equal(rs.content_type, "application/problem+json");
    json_t *doc = json_loadb(rs.body, rs.len, 0, NULL);
    assert_non_null(doc);
    assert_int_equal(json_integer_value(json_object_get(doc, "status")), 400);
    assert_string_equal(json_string_value(json_object_get(doc, "title")), "Bad Request");
    assert_string_equal(json_string_value(json_object_get(doc, "detail")),
                        "tp_size must be in 1..8");
    assert_non_null(strstr(json_string_value(json_object_get(doc, "type")), "400"));
    json_t *e0 = json_array_get(json_object_get(doc, "errors"), 0);
    assert_string_equal(json_string_value(json_object_get(e0, "field")), "params.tp_size");
    assert_string_equal(json_string_value(json_object_get(e0, "code")), "out_of_range");
    json_decref(doc);
    /* without a field: no errors list; a detail with quotes stays valid JSON */
    resp_problem(&rs, 413, "body \"too\" large", NULL);
    doc = json_loadb(rs.body, rs.len, 0, NULL);
    assert_non_null(doc);
    assert_null(json_object_get(doc, "errors"));
    assert_string_equal(json_string_value(json_object_get(doc, "title")), "Payload Too Large");
    assert_string_equal(json_string_value(json_object_get(doc, "detail")), "body \"too\" large");
    json_decref(doc);
    free(rs.body);
}

/* ---- params ---------------------------------------------------------------- */

static const char *const FORMATS[] = {"auto", "pt", NULL};
static const mp_param_spec SPEC[] = {
    {"load_format", MP_P_STRING, FORMATS, 0, 0}, {"tp_size", MP_P_INT, NULL, 1, 8},
    {"tp_sizes", MP_P_INT_ARRAY, NULL, 1, 64},   {"keep", MP_P_BOOL, NULL, 0, 0},
    {"patterns", MP_P_STRING_ARRAY, NULL, 0, 0}, {NULL, 0, NULL, 0, 0},
};

static void expect_param_error(const char *json, const char *field) {
    json_t *p = json_loads(json, 0, NULL);
    assert_non_null(p);
    mp_error err = {0};
    assert_int_equal(params_check(SPEC, p, &err), -1);
    assert_string_equal(err.field, field);
    json_decref(p);
}

static void test_params(void **state) {
    (void)state;
    json_t *ok = json_loads("{\"load_format\":\"pt\",\"tp_size\":4,\"tp_sizes\":[1,2],"
                            "\"keep\":true,\"patterns\":[\"*.json\"]}",
                            0, NULL);
    mp_error err = {0};
    assert_int_equal(params_check(SPEC, ok, &err), 0);
    json_decref(ok);
    expect_param_error("{\"nope\":1}", "params.nope");
    expect_param_error("{\"load_format\":\"gguf\"}", "params.load_format");
    expect_param_error("{\"load_format\":3}", "params.load_format");
    expect_param_error("{\"tp_size\":0}", "params.tp_size");
    expect_param_error("{\"tp_size\":\"2\"}", "params.tp_size");
    expect_param_error("{\"tp_sizes\":[1,100]}", "params.tp_sizes");
    expect_param_error("{\"keep\":1}", "params.keep");
    expect_param_error("{\"patterns\":[1]}", "params.patterns");
    expect_param_error("{\"patterns\":\"*.json\"}", "params.patterns");
}

/* ---- model references ------------------------------------------------------- */

static void test_model_ref(void **state) {
    (void)state;
    assert_true(mref_is_repo_id("meta-llama/Llama-3.1-8B"));
    assert_true(mref_is_repo_id("a/b"));
    assert_false(mref_is_repo_id("a"));
    assert_false(mref_is_repo_id("a/b/c"));
    assert_false(mref_is_repo_id("../b"));
    assert_false(mref_is_repo_id("a/.."));
    assert_false(mref_is_repo_id("a/b..c"));
    assert_false(mref_is_repo_id("/abs/path"));
    assert_true(mref_is_revision("main"));
    assert_true(mref_is_revision("refs/pr/1"));
    assert_false(mref_is_revision("../etc"));
    assert_false(mref_is_revision(""));

    char tmpl[] = "/tmp/mp-unit-XXXXXX";
    char *root = mkdtemp(tmpl);
    assert_non_null(root);
    char *real_root = realpath(root, NULL);
    char inside[512], link[512], file[512];
    snprintf(inside, sizeof inside, "%s/m", real_root);
    snprintf(link, sizeof link, "%s/out", real_root);
    snprintf(file, sizeof file, "%s/f", real_root);
    mkdir(inside, 0755);
    assert_int_equal(symlink("/usr", link), 0);
    FILE *fp = fopen(file, "w");
    fclose(fp);
    const char *roots[] = {real_root, NULL};
    char *out = NULL;
    mp_error err = {0};
    assert_int_equal(mref_confine(inside, strlen(inside), roots, &out, &err), 0);
    assert_string_equal(out, inside);
    free(out);
    assert_int_equal(mref_confine(link, strlen(link), roots, &out, &err), -1);
    assert_string_equal(err.field, "model");
    assert_int_equal(mref_confine(file, strlen(file), roots, &out, &err), -1);
    char dotdot[600];
    snprintf(dotdot, sizeof dotdot, "%s/m/../m", real_root);
    assert_int_equal(mref_confine(dotdot, strlen(dotdot), roots, &out, &err), -1);
    char nul[600];
    memcpy(nul, inside, strlen(inside) + 1);
    assert_int_equal(mref_confine(nul, strlen(nul) + 2, roots, &out, &err), -1);
    assert_int_equal(mref_confine("relative/x", 10, roots, &out, &err), -1);
    const char *noroots[] = {NULL};
    assert_int_equal(mref_confine(inside, strlen(inside), noroots, &out, &err), -1);
    /* a prefix that is not a path boundary: /tmp/mp-unit-XXXXXXevil */
    char sibling[600];
    snprintf(sibling, sizeof sibling, "%sevil", real_root);
    mkdir(sibling, 0755);
    assert_int_equal(mref_confine(sibling, strlen(sibling), roots, &out, &err), -1);
    rmdir(sibling);
    unlink(link);
    unlink(file);
    rmdir(inside);
    rmdir(real_root);
    free(real_root);
}

/* ---- sbuf ---------------------------------------------------------------- */

static void test_sbuf_json_escape(void **state) {
    (void)state;
    sbuf sb = {0};
    sb_json_str(&sb, "a\"b\\c\n\x01z");
    char *s = sb_take(&sb, NULL);
    assert_string_equal(s, "\"a\\\"b\\\\c\\u000a\\u0001z\"");
    json_t *back = json_loads(s, JSON_DECODE_ANY, NULL);
    assert_string_equal(json_string_value(back), "a\"b\\c\n\x01z");
    json_decref(back);
    free(s);
}

/* ---- store ---------------------------------------------------------------- */

static store *open_store(char *dir_out) {
    char tmpl[] = "/tmp/mp-store-XXXXXX";
    char *d = mkdtemp(tmpl);
    strcpy(dir_out, d);
    char path[600];
    snprintf(path, sizeof path, "%s/t.db", d);
    store *s = NULL;
    mp_error err = {0};
    assert_int_equal(store_open(path, 3, &s, &err), 0);
    return s;
}

static json_t *job_doc(const char *id) {
    return json_pack("{s:s,s:s,s:s,s:s,s:{},s:s,s:s}", "id", id, "type", "verify", "model", "o/m",
                     "revision", "main", "params", "state", "queued", "created_at",
                     "2026-01-01T00:00:00Z");
}

static bool always_resume(void *arg, const char *type, json_t *doc) {
    (void)arg;
    (void)doc;
    return strcmp(type, "download") == 0;
}

static void test_store_jobs(void **state) {
    (void)state;
    char dir[600];
    store *s = open_store(dir);
    mp_error err = {0};
    char *existing = NULL;
    for (int i = 0; i < 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "j_%d", i);
        json_t *d = job_doc(id);
        assert_int_equal(
            store_job_insert(s, id, "verify", "o/m", "main", d, NULL, NULL, "", &existing, &err),
            0);
        json_decref(d);
    }
    /* idempotency: same key, same hash → the first id; other hash → conflict */
    json_t *d = job_doc("j_k1");
    assert_int_equal(
        store_job_insert(s, "j_k1", "verify", "o/m", "main", d, NULL, "k", "h1", &existing, &err),
        0);
    assert_null(existing);
    assert_int_equal(
        store_job_insert(s, "j_k2", "verify", "o/m", "main", d, NULL, "k", "h1", &existing, &err),
        0);
    assert_string_equal(existing, "j_k1");
    free(existing);
    existing = NULL;
    assert_int_equal(
        store_job_insert(s, "j_k3", "verify", "o/m", "main", d, NULL, "k", "h2", &existing, &err),
        -1);
    assert_string_equal(err.code, "idempotency_conflict");
    json_decref(d);
    assert_null(store_job_get(s, "j_k2"));

    /* claims are FIFO and atomic */
    json_t *cp = NULL;
    json_t *c0 = store_job_claim(s, "2026-01-01T00:00:01Z", &cp);
    assert_string_equal(json_string_value(json_object_get(c0, "id")), "j_0");
    assert_string_equal(json_string_value(json_object_get(c0, "state")), "running");
    json_decref(c0);
    json_t *ck = json_pack("{s:i}", "offset", 42);
    assert_int_equal(store_job_set_checkpoint(s, "j_1", ck), 0);
    json_decref(ck);
    /* cancel only while queued */
    assert_int_equal(store_job_cancel_if_queued(s, "j_0", "t", NULL), 0);
    assert_int_equal(store_job_cancel_if_queued(s, "j_2", "t", NULL), 1);
    json_t *g = store_job_get(s, "j_2");
    assert_string_equal(json_string_value(json_object_get(g, "state")), "cancelled");
    json_decref(g);

    /* list: newest first, paging by cursor */
    sbuf out = {0};
    assert_int_equal(store_job_list(s, NULL, NULL, NULL, NULL, 2, NULL, &out, &err), 0);
    json_t *list = json_loads(out.buf, 0, NULL);
    sb_free(&out);
    assert_int_equal(json_array_size(json_object_get(list, "jobs")), 2);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(json_object_get(list, "jobs"), 0), "id")),
        "j_k1");
    const char *cur = json_string_value(json_object_get(list, "next_cursor"));
    assert_non_null(cur);
    assert_int_equal(store_job_list(s, NULL, NULL, NULL, NULL, 10, cur, &out, &err), 0);
    json_t *list2 = json_loads(out.buf, 0, NULL);
    sb_free(&out);
    assert_int_equal(json_array_size(json_object_get(list2, "jobs")), 2);
    assert_true(json_is_null(json_object_get(list2, "next_cursor")));
    json_decref(list);
    json_decref(list2);
    assert_int_equal(store_job_list(s, "running", NULL, NULL, NULL, 10, NULL, &out, &err), 0);
    list = json_loads(out.buf, 0, NULL);
    sb_free(&out);
    assert_int_equal(json_array_size(json_object_get(list, "jobs")), 1);
    json_decref(list);
    assert_int_equal(store_job_list(s, NULL, NULL, NULL, NULL, 10, "-5", &out, &err), -1);
    sb_free(&out);

    /* recovery: the running verify job is failed as interrupted */
    int rq = 0, fl = 0;
    assert_int_equal(store_job_recover(s, "t", always_resume, NULL, &rq, &fl), 0);
    assert_int_equal(rq, 0);
    assert_int_equal(fl, 1);
    g = store_job_get(s, "j_0");
    assert_string_equal(json_string_value(json_object_get(g, "state")), "failed");
    assert_string_equal(json_string_value(json_object_get(json_object_get(g, "error"), "code")),
                        "interrupted");
    json_decref(g);
    /* a checkpoint comes back with the claim */
    json_t *c1 = store_job_claim(s, "t", &cp);
    assert_string_equal(json_string_value(json_object_get(c1, "id")), "j_1");
    assert_int_equal(json_integer_value(json_object_get(cp, "offset")), 42);
    json_decref(cp);
    json_decref(c1);
    store_close(s);

    /* reopening runs no migration twice and keeps the data */
    char path[700];
    snprintf(path, sizeof path, "%s/t.db", dir);
    assert_int_equal(store_open(path, 1, &s, &err), 0);
    g = store_job_get(s, "j_1");
    assert_string_equal(json_string_value(json_object_get(g, "state")), "running");
    json_decref(g);
    /* hashes, inspections, residents */
    assert_int_equal(store_hash_put(s, "o/m", "main", "a.bin", 3, "abc"), 0);
    json_t *h = store_hashes_get(s, "o/m", "main");
    assert_string_equal(json_string_value(json_object_get(json_object_get(h, "a.bin"), "sha256")),
                        "abc");
    json_decref(h);
    json_t *res = json_pack("{s:s}", "id", "r_1");
    assert_int_equal(store_resident_put(s, "r_1", "o/m", "main", "resident", res), 0);
    json_decref(res);
    assert_int_equal(store_resident_mark_all_gone(s), 0);
    json_t *r1 = store_resident_get(s, "r_1");
    assert_string_equal(json_string_value(json_object_get(r1, "state")), "gone");
    json_decref(r1);
    store_close(s);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static bool resume_unless_child(void *arg, const char *type, json_t *doc) {
    (void)arg;
    (void)type;
    return !json_is_string(json_object_get(doc, "parent"));
}

/* Outputs are exclusive among active jobs; children carry and filter by
 * their parent; recovery sees the document so children are not re-queued. */
static void test_store_outputs_and_children(void **state) {
    (void)state;
    char dir[600];
    store *s = open_store(dir);
    mp_error err = {0};
    char *existing = NULL;
    json_t *a = job_doc("j_a");
    assert_int_equal(store_job_insert(s, "j_a", "convert", "o/m", "main", a, "/d/converted/x", NULL,
                                      "", &existing, &err),
                     0);
    json_t *b = job_doc("j_b");
    assert_int_equal(store_job_insert(s, "j_b", "convert", "o/m", "main", b, "/d/converted/x", NULL,
                                      "", &existing, &err),
                     -1);
    assert_string_equal(err.code, "output_busy");
    assert_non_null(strstr(err.message, "j_a"));
    assert_null(store_job_get(s, "j_b"));
    /* once the first has ended, the folder is free again */
    json_object_set_new(a, "state", json_string("failed"));
    assert_int_equal(store_job_update(s, "j_a", a, NULL, NULL, &err), 0);
    assert_int_equal(store_job_insert(s, "j_b", "convert", "o/m", "main", b, "/d/converted/x", NULL,
                                      "", &existing, &err),
                     0);
    /* a child, inserted running under its parent */
    json_t *p = job_doc("j_p");
    json_object_set_new(p, "type", json_string("prepare"));
    assert_int_equal(
        store_job_insert(s, "j_p", "prepare", "o/m", "main", p, NULL, NULL, "", &existing, &err),
        0);
    json_t *c = job_doc("j_c");
    json_object_set_new(c, "state", json_string("running"));
    json_object_set_new(c, "parent", json_string("j_p"));
    assert_int_equal(
        store_job_insert(s, "j_c", "inspect", "o/m", "main", c, NULL, NULL, "", &existing, &err),
        0);
    sbuf out = {0};
    assert_int_equal(store_job_list(s, NULL, NULL, NULL, "j_p", 10, NULL, &out, &err), 0);
    json_t *list = json_loads(out.buf, 0, NULL);
    sb_free(&out);
    assert_int_equal(json_array_size(json_object_get(list, "jobs")), 1);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(json_object_get(list, "jobs"), 0), "id")),
        "j_c");
    json_decref(list);
    /* the parent running too, then a crash: the child fails, the parent is re-queued */
    json_object_set_new(p, "state", json_string("running"));
    assert_int_equal(store_job_update(s, "j_p", p, NULL, NULL, &err), 0);
    int rq = 0, fl = 0;
    assert_int_equal(store_job_recover(s, "t", resume_unless_child, NULL, &rq, &fl), 0);
    assert_int_equal(rq, 1);
    assert_int_equal(fl, 1);
    json_t *g = store_job_get(s, "j_c");
    assert_string_equal(json_string_value(json_object_get(g, "state")), "failed");
    json_decref(g);
    json_decref(a);
    json_decref(b);
    json_decref(p);
    json_decref(c);
    store_close(s);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_store_outputs_and_children),
        cmocka_unit_test(test_router_match),
        cmocka_unit_test(test_openapi_matches_routes),
        cmocka_unit_test(test_openapi_job_params),
        cmocka_unit_test(test_problem_json),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_model_ref),
        cmocka_unit_test(test_sbuf_json_escape),
        cmocka_unit_test(test_store_jobs),
    };
    return cmocka_run_group_tests_name("core", tests, NULL, NULL);
}
