/*
 * test_prepare.c - the plan of a prepare job (loader/prepare): the rule
 * table (which steps for which model, engine and tp), skipping what is in
 * place, re-running what reads a rebuilt input, and the records that say
 * whether an output is still in place (source, options, file sizes).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/prepare/prepare.h"

/* "download:run convert:skip ..." of a plan, for compact assertions. */
static void plan_text(const prep_facts *f, const prep_request *r, char *out, size_t len) {
    prep_step s[PREP_NKINDS];
    size_t n = prep_plan(f, r, s);
    out[0] = 0;
    size_t used = 0;
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(out + used, len - used, "%s%s:%s", i ? " " : "",
                                 prep_kind_name(s[i].kind), s[i].run ? "run" : "skip");
    for (size_t i = 0; i < n; i++)
        assert_true(s[i].reason[0] != 0); /* every step says why */
}

static void test_rule_table(void **state) {
    (void)state;
    char t[256];
    prep_request sg2 = {PREP_SGLANG, 2, true}, sg1 = {PREP_SGLANG, 1, false};
    prep_request vl2 = {PREP_VLLM, 2, false}, tf4 = {PREP_TRANSFORMERS, 4, false};
    /* a hub repo not cached, .bin only, sglang tp 2, load: everything */
    prep_facts f = {.is_hub = true, .formats_known = true, .has_convertible = true};
    plan_text(&f, &sg2, t, sizeof t);
    assert_string_equal(t, "download:run convert:run inspect:run shard:run warm_load:run");
    /* safetensors: no convert; tp 1: no shard; no load: no warm_load */
    f.has_convertible = false;
    f.has_safetensors = true;
    plan_text(&f, &sg1, t, sizeof t);
    assert_string_equal(t, "download:run inspect:run");
    /* both formats: safetensors wins, no convert */
    f.has_convertible = true;
    plan_text(&f, &sg1, t, sizeof t);
    assert_string_equal(t, "download:run inspect:run");
    /* vLLM and transformers load the plain checkpoint at any tp */
    plan_text(&f, &vl2, t, sizeof t);
    assert_string_equal(t, "download:run inspect:run");
    plan_text(&f, &tf4, t, sizeof t);
    assert_string_equal(t, "download:run inspect:run");
    assert_true(prep_engine_shards(PREP_SGLANG, 2));
    assert_false(prep_engine_shards(PREP_SGLANG, 1));
    assert_false(prep_engine_shards(PREP_VLLM, 8));
    /* a local folder: no download step at all */
    prep_facts local = {.formats_known = true, .has_convertible = true};
    plan_text(&local, &sg2, t, sizeof t);
    assert_string_equal(t, "convert:run inspect:run shard:run warm_load:run");
    /* formats unknown (a repo we could not list): no convert planned yet */
    prep_facts unknown = {.is_hub = true};
    plan_text(&unknown, &sg1, t, sizeof t);
    assert_string_equal(t, "download:run inspect:run");
}

static void test_skip_and_rebuild(void **state) {
    (void)state;
    char t[256];
    prep_request sg2 = {PREP_SGLANG, 2, true};
    prep_facts f = {.is_hub = true,
                    .cached = true,
                    .formats_known = true,
                    .has_convertible = true,
                    .in_place = {false, true, true, true, true}};
    /* everything in place: all skipped */
    plan_text(&f, &sg2, t, sizeof t);
    assert_string_equal(t, "download:skip convert:skip inspect:skip shard:skip warm_load:skip");
    /* the hub moved on: everything after the download runs again */
    f.stale = true;
    plan_text(&f, &sg2, t, sizeof t);
    assert_string_equal(t, "download:run convert:run inspect:run shard:run warm_load:run");
    f.stale = false;
    /* offline: the cache is used, and the reason says so */
    f.offline = true;
    prep_step s[PREP_NKINDS];
    prep_plan(&f, &sg2, s);
    assert_false(s[0].run);
    assert_non_null(strstr(s[0].reason, "could not be reached"));
    f.offline = false;
    /* a missing shard: shard and the load of it run, nothing before */
    f.in_place[PREP_SHARD] = false;
    plan_text(&f, &sg2, t, sizeof t);
    assert_string_equal(t, "download:skip convert:skip inspect:skip shard:run warm_load:run");
    /* ... and once shard ran in this job, its reader still runs */
    f.in_place[PREP_SHARD] = true;
    f.ran[PREP_SHARD] = true;
    plan_text(&f, &sg2, t, sizeof t);
    assert_string_equal(t, "download:skip convert:skip inspect:skip shard:run warm_load:run");
}

static void test_records(void **state) {
    (void)state;
    char tmpl[] = "/tmp/mp-prep-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    char p[512];
    snprintf(p, sizeof p, "%s/a.safetensors", d);
    FILE *fp = fopen(p, "w");
    assert_non_null(fp);
    fputs("0123456789", fp);
    fclose(fp);
    json_t *opts = json_pack("{s:s}", "dtype", "bf16");
    json_t *e = prep_record_entry("org/m@abc", opts, d, "j_1");
    assert_non_null(e);
    char why[256];
    assert_true(prep_record_verifies(e, "org/m@abc", opts, why, sizeof why));
    /* another source, other options, a changed size, a missing file */
    assert_false(prep_record_verifies(e, "org/m@def", opts, why, sizeof why));
    json_t *other = json_pack("{s:s}", "dtype", "fp16");
    assert_false(prep_record_verifies(e, "org/m@abc", other, why, sizeof why));
    assert_false(prep_record_verifies(NULL, "org/m@abc", opts, why, sizeof why));
    fp = fopen(p, "a");
    fputs("x", fp);
    fclose(fp);
    assert_false(prep_record_verifies(e, "org/m@abc", opts, why, sizeof why));
    assert_non_null(strstr(why, "a.safetensors"));
    unlink(p);
    assert_false(prep_record_verifies(e, "org/m@abc", opts, why, sizeof why));
    assert_non_null(strstr(why, "missing"));
    /* save and load round trip; the record file is named like convert's output */
    char *rp = prep_record_path(d, "org/m", "main", true);
    assert_non_null(rp);
    assert_non_null(strstr(rp, "/prepared/org--m-main.json"));
    json_t *rec = json_pack("{s:O}", "convert", e);
    mp_error err = {0};
    assert_int_equal(prep_record_save(rp, rec, &err), 0);
    json_t *back = prep_record_load(rp);
    assert_true(json_equal(back, rec));
    json_t *none = prep_record_load("/nonexistent/x.json");
    assert_int_equal(json_object_size(none), 0);
    prep_engine en;
    assert_true(prep_parse_engine("vllm", &en));
    assert_int_equal(en, PREP_VLLM);
    assert_false(prep_parse_engine("tgi", &en));
    json_decref(none);
    json_decref(back);
    json_decref(rec);
    json_decref(other);
    json_decref(opts);
    json_decref(e);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", d);
    assert_int_equal(system(cmd), 0);
    free(rp);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule_table),
        cmocka_unit_test(test_skip_and_rebuild),
        cmocka_unit_test(test_records),
    };
    return cmocka_run_group_tests_name("prepare", tests, NULL, NULL);
}
