/*
 * test_hub.c - the pure parts of the hub client: file selection by
 * load_format (SGLang's rules), fnmatch with Python's semantics, path
 * safety, cache paths, Retry-After, error mapping and response parsing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "loader/hub/hub.h"

/* ---- fnmatch ------------------------------------------------------------------ */

static void test_fnmatch_python_semantics(void **state) {
    (void)state;
    /* '*' crosses '/', as fnmatch.fnmatchcase does */
    assert_true(hub_fnmatch("*.safetensors", "model.safetensors"));
    assert_true(hub_fnmatch("*.safetensors", "sub/dir/model.safetensors"));
    assert_false(hub_fnmatch("*.safetensors", "model.safetensors.index.json"));
    assert_true(hub_fnmatch("original/*", "original/a/b.pth"));
    assert_true(hub_fnmatch("original/**/*", "original/x/y"));
    assert_false(hub_fnmatch("original/**/*", "original/y")); /* needs a '/' after ** */
    assert_true(hub_fnmatch("model-0000?-of-00002.*", "model-00001-of-00002.bin"));
    assert_false(hub_fnmatch("?", ""));
    assert_true(hub_fnmatch("*", ""));
    assert_true(hub_fnmatch("[mc]onfig.json", "config.json"));
    assert_false(hub_fnmatch("[!c]onfig.json", "config.json"));
    assert_true(hub_fnmatch("[a-c]x", "bx"));
    assert_false(hub_fnmatch("[c-a]x", "bx")); /* reversed range matches nothing */
    assert_true(hub_fnmatch("[]]", "]"));
    assert_true(hub_fnmatch("[!]]", "a"));
    assert_true(hub_fnmatch("a[", "a["));          /* lone '[' is literal */
    assert_true(hub_fnmatch("[^a]", "^"));         /* '^' is not negation in Python */
    assert_true(hub_fnmatch("a\\b", "a\\b"));      /* no backslash escapes */
    assert_false(hub_fnmatch("A.json", "a.json")); /* case-sensitive */
    assert_true(hub_fnmatch("*a*b*c", "xxaxxbxxc"));
    assert_false(hub_fnmatch("*a*b*c", "xxaxxbxx"));
}

static void test_pattern_filter(void **state) {
    (void)state;
    const char *allow[] = {"*.json", "tokenizer/"};
    const char *ignore[] = {"*.index.json"};
    assert_true(hub_pattern_filter("config.json", allow, 2, ignore, 1));
    assert_false(hub_pattern_filter("model.safetensors.index.json", allow, 2, ignore, 1));
    assert_true(hub_pattern_filter("tokenizer/vocab.txt", allow, 2, NULL, 0)); /* "dir/" */
    assert_false(hub_pattern_filter("model.bin", allow, 2, NULL, 0));
    assert_true(hub_pattern_filter("model.bin", NULL, 0, NULL, 0));
    assert_false(hub_pattern_filter("model.bin", allow, 0, NULL, 0)); /* [] allows nothing */
    const char *win[] = {"sub\\*.bin"};
    assert_true(hub_pattern_filter("sub/a.bin", win, 1, NULL, 0));
}

/* ---- path safety ---------------------------------------------------------------- */

static void test_path_safe(void **state) {
    (void)state;
#define SAFE(s) hub_path_safe(s, strlen(s))
    assert_true(SAFE("config.json"));
    assert_true(SAFE("a/b/c.bin"));
    assert_true(SAFE("..hidden")); /* a name, not a parent */
    assert_false(SAFE("../../evil"));
    assert_false(SAFE("a/../b"));
    assert_false(SAFE("a/.."));
    assert_false(SAFE("/etc/passwd"));
    assert_false(SAFE("a//b"));
    assert_false(SAFE("a/./b"));
    assert_false(SAFE("a/"));
    assert_false(SAFE(""));
    assert_false(SAFE("a\\..\\b"));
    assert_false(SAFE("a\nb"));
    assert_false(hub_path_safe("ab\0c", 4)); /* embedded NUL */
    char longname[300];
    memset(longname, 'a', 299);
    longname[299] = 0;
    assert_false(SAFE(longname)); /* component over 255 */
#undef SAFE
}

/* ---- cache paths ------------------------------------------------------------------- */

static void test_cache_paths(void **state) {
    (void)state;
    char buf[512];
    mp_error err;
    assert_int_equal(hub_repo_dir(buf, sizeof buf, "/c", "meta-llama/Llama-3.1-8B", &err), 0);
    assert_string_equal(buf, "/c/models--meta-llama--Llama-3.1-8B");
    assert_int_equal(hub_repo_dir(buf, sizeof buf, "/c", "../x", &err), -1);
    assert_false(hub_repo_id_valid("a/b/c"));
    assert_false(hub_repo_id_valid("a--b/c"));
    assert_false(hub_repo_id_valid("a/.."));
    assert_false(hub_repo_id_valid("noslash"));
    assert_true(hub_repo_id_valid("Qwen/Qwen2.5-0.5B_x"));
    const char *etag = "3e0f227e3faefb082abd836139482c643186be4f86aa8ff7af5a60d4aef1e29d";
    assert_int_equal(hub_link_target(buf, sizeof buf, "config.json", etag, &err), 0);
    assert_string_equal(
        buf, "../../blobs/3e0f227e3faefb082abd836139482c643186be4f86aa8ff7af5a60d4aef1e29d");
    assert_int_equal(hub_link_target(buf, sizeof buf, "a/b/c.json", etag, &err), 0);
    assert_true(strncmp(buf, "../../../../blobs/", 18) == 0);
    assert_int_equal(hub_link_target(buf, sizeof buf, "../x", etag, &err), -1);
    assert_string_equal(err.code, "unsafe_path");
    assert_int_equal(hub_link_target(buf, sizeof buf, "x", "../../etc", &err), -1);
    /* SGLang's get_lock name: sha256("org-name") + "org-name" + ".lock" */
    assert_int_equal(hub_lock_path(buf, sizeof buf, "/c", "acme/tiny"), 0);
    assert_string_equal(buf, "/c/.locks/"
                             "033d4e76370f536e934712809b5b04f3a8679f7a56941ea26dffc999468fa957"
                             "acme-tiny.lock");
    assert_true(hub_is_commit("276093f0372c17ac3097a5b9b0e31c35fb866a4f"));
    assert_false(hub_is_commit("276093F0372c17ac3097a5b9b0e31c35fb866a4f"));
    assert_false(hub_is_commit("main"));
}

static bool cancel_after_3(void *arg) {
    int *n = arg;
    return ++*n > 3;
}

/* Two jobs on one repo: the second waits (here: gives up on cancel) until
 * the first lets go. */
static void test_repo_lock(void **state) {
    (void)state;
    char dir[] = "/tmp/test_hub_lock.XXXXXX";
    assert_non_null(mkdtemp(dir));
    mp_error err;
    int fd = hub_lock_repo(dir, "acme/tiny", NULL, NULL, &err);
    assert_true(fd >= 0);
    int polls = 0;
    assert_int_equal(hub_lock_repo(dir, "acme/tiny", cancel_after_3, &polls, &err), -1);
    assert_string_equal(err.code, "cancelled");
    assert_int_equal(polls, 4);
    int other = hub_lock_repo(dir, "acme/other", NULL, NULL, &err); /* other repos are free */
    assert_true(other >= 0);
    close(fd);
    polls = 0;
    int again = hub_lock_repo(dir, "acme/tiny", cancel_after_3, &polls, &err);
    assert_true(again >= 0);
    close(again);
    close(other);
    char path[512];
    assert_int_equal(hub_lock_path(path, sizeof path, dir, "acme/tiny"), 0);
    unlink(path);
    assert_int_equal(hub_lock_path(path, sizeof path, dir, "acme/other"), 0);
    unlink(path);
    snprintf(path, sizeof path, "%s/.locks", dir);
    rmdir(path);
    assert_int_equal(rmdir(dir), 0);
}

/* ---- protocol helpers ------------------------------------------------------------ */

static void test_retry_after(void **state) {
    (void)state;
    time_t now = 1700000000; /* 2023-11-14T22:13:20Z */
    assert_true(hub_parse_retry_after("3", now) == 3.0);
    assert_true(hub_parse_retry_after(" 0 ", now) == 0.0);
    assert_true(hub_parse_retry_after("99999", now) == 600.0); /* clamped */
    assert_true(hub_parse_retry_after("Tue, 14 Nov 2023 22:13:25 GMT", now) == 5.0);
    assert_true(hub_parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0); /* past */
    assert_true(hub_parse_retry_after("soon", now) < 0);
    assert_true(hub_parse_retry_after("5x", now) < 0);
    assert_true(hub_parse_retry_after("", now) < 0);
    assert_true(hub_parse_retry_after(NULL, now) < 0);
}

static void test_backoff(void **state) {
    (void)state;
    uint64_t seed = 42;
    double prev = 0;
    for (int a = 0; a < 5; a++) {
        double d = hub_backoff_s(a, 0.3, &seed);
        double base = 0.3 * (1 << a);
        assert_true(d >= base && d < base + 0.3 + 1e-9);
        assert_true(d > prev);
        prev = d;
    }
    assert_true(hub_backoff_s(30, 0.3, &seed) <= 10.5); /* capped */
}

static void test_error_codes(void **state) {
    (void)state;
    assert_string_equal(hub_error_code(404, "RepoNotFound", true), "repo_not_found");
    assert_string_equal(hub_error_code(401, "RepoNotFound", true), "repo_not_found");
    assert_string_equal(hub_error_code(404, "RevisionNotFound", true), "revision_not_found");
    assert_string_equal(hub_error_code(404, "EntryNotFound", false), "file_not_found");
    assert_string_equal(hub_error_code(403, "GatedRepo", false), "unauthorized");
    assert_string_equal(hub_error_code(401, "", true), "unauthorized");
    assert_string_equal(hub_error_code(404, NULL, false), "file_not_found");
    assert_string_equal(hub_error_code(404, NULL, true), "repo_not_found");
    assert_string_equal(hub_error_code(400, NULL, true), "hub_error");
    assert_null(hub_error_code(500, NULL, true));
    assert_null(hub_error_code(503, NULL, false));
    assert_null(hub_error_code(429, NULL, false));
    assert_null(hub_error_code(408, NULL, false));
    /* what to do about a 401/403: set HF_TOKEN, or check the one sent */
    assert_non_null(strstr(hub_error_hint("unauthorized", false), "set HF_TOKEN"));
    assert_non_null(strstr(hub_error_hint("unauthorized", true), "HF_TOKEN"));
    assert_non_null(strstr(hub_error_hint("unauthorized", true), "refused"));
    assert_string_equal(hub_error_hint("repo_not_found", false), "");
    assert_string_equal(hub_error_hint(NULL, false), "");
}

/* The free-space check counts the margin and says so: a 0.5 MB download
 * with 64 MiB free is refused with the sum spelled out. */
static void test_space_margin(void **state) {
    (void)state;
    mp_error err = {0};
    assert_int_equal(hub_check_space(511659, HUB_SPACE_MARGIN + 511659, "/c", &err), 0);
    assert_int_equal(hub_check_space(0, HUB_SPACE_MARGIN, "/c", &err), 0);
    assert_int_equal(hub_check_space(511659, 66936832, "/c/blobs", &err), -1);
    assert_string_equal(err.code, "insufficient_space");
    assert_string_equal(err.message,
                        "need 511659 bytes + 64 MiB margin = 67620523 bytes in /c/blobs, 66936832 "
                        "free; free up space there or point HF_HUB_CACHE at a larger disk");
    assert_int_equal(hub_check_space(UINT64_MAX - 1, UINT64_MAX - 2, "/c", &err), -1);
}

static void test_etag_and_range(void **state) {
    (void)state;
    char out[65];
    const char *sha = "3e0f227e3faefb082abd836139482c643186be4f86aa8ff7af5a60d4aef1e29d";
    char q[80];
    snprintf(q, sizeof q, "W/\"%s\"", sha);
    assert_true(hub_normalize_etag(q, out, sizeof out));
    assert_string_equal(out, sha);
    assert_true(
        hub_normalize_etag("\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"", out, sizeof out));
    assert_false(hub_normalize_etag("\"xyz\"", out, sizeof out));
    assert_false(
        hub_normalize_etag("\"../../../../../../../../../../../../../../../x\"", out, sizeof out));
    uint64_t a, b, t;
    assert_int_equal(hub_parse_content_range("bytes 10-19/100", &a, &b, &t), 0);
    assert_true(a == 10 && b == 19 && t == 100);
    assert_int_equal(hub_parse_content_range("bytes 10-9/100", &a, &b, &t), -1);
    assert_int_equal(hub_parse_content_range("bytes 0-100/100", &a, &b, &t), -1);
    assert_int_equal(hub_parse_content_range("bytes */100", &a, &b, &t), -1);
    assert_int_equal(hub_parse_content_range("bytes 0-1/2 junk", &a, &b, &t), -1);
    char enc[64];
    assert_int_equal(hub_url_quote(enc, sizeof enc, "refs/pr/1", false), 0);
    assert_string_equal(enc, "refs%2Fpr%2F1");
    assert_int_equal(hub_url_quote(enc, sizeof enc, "a b/c#d", true), 0);
    assert_string_equal(enc, "a%20b/c%23d");
}

static const char *LISTING =
    "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":["
    "{\"rfilename\":\"config.json\",\"size\":124,\"blobId\":"
    "\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"},"
    "{\"rfilename\":\"model.safetensors\",\"size\":10,\"blobId\":"
    "\"1111111111111111111111111111111111111111\","
    "\"lfs\":{\"sha256\":\"3e0f227e3faefb082abd836139482c643186be4f86aa8ff7af5a60d4aef1e29d\","
    "\"size\":3145832,\"pointerSize\":134}}]}";

static void test_parse_listing(void **state) {
    (void)state;
    hub_listing l;
    mp_error err;
    assert_int_equal(hub_parse_listing(LISTING, strlen(LISTING), &l, &err), 0);
    assert_string_equal(l.commit, "276093f0372c17ac3097a5b9b0e31c35fb866a4f");
    assert_int_equal(l.nfiles, 2);
    assert_string_equal(l.files[0].name, "config.json");
    assert_false(l.files[0].lfs);
    assert_string_equal(l.files[0].etag, "241664a1351e77d2701a39b3ec9b47a2e1a9140e");
    assert_true(l.files[1].lfs);
    assert_true(l.files[1].size == 3145832); /* the LFS size, not the pointer's */
    assert_string_equal(l.files[1].etag, l.files[1].sha256);
    hub_listing_free(&l);

    const char *bad[] = {
        "[]",
        "{\"sha\":\"main\",\"siblings\":[]}",
        "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\"}",
        "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":[{\"rfilename\":\"x\"}]"
        "}",
        "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":[{\"rfilename\":\"x\","
        "\"size\":1,"
        "\"blobId\":\"../../../../../../../../../../../../../x\"}]}",
        "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":[{\"rfilename\":\"x\","
        "\"size\":-1,"
        "\"blobId\":\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"}]}",
        "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":["
        "{\"rfilename\":\"x\",\"size\":1,\"blobId\":\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"},"
        "{\"rfilename\":\"x\",\"size\":1,\"blobId\":\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"}]"
        "}",
        "not json",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(hub_parse_listing(bad[i], strlen(bad[i]), &l, &err), -1);
        assert_string_equal(err.code, "bad_response");
    }
    const char *evil[] = {"../../evil", "/etc/passwd", "a/../../b", "a\\u0000b"};
    for (size_t i = 0; i < sizeof evil / sizeof evil[0]; i++) {
        char doc[512];
        snprintf(
            doc, sizeof doc,
            "{\"sha\":\"276093f0372c17ac3097a5b9b0e31c35fb866a4f\",\"siblings\":[{\"rfilename\":"
            "\"%s\",\"size\":1,\"blobId\":\"241664a1351e77d2701a39b3ec9b47a2e1a9140e\"}]}",
            evil[i]);
        assert_int_equal(hub_parse_listing(doc, strlen(doc), &l, &err), -1);
        assert_string_equal(err.code, "unsafe_path");
    }
}

/* ---- selection ------------------------------------------------------------------ */

static hub_listing make_listing(const char *const *names, size_t n) {
    hub_listing l = {0};
    l.files = calloc(n, sizeof *l.files);
    l.nfiles = n;
    for (size_t i = 0; i < n; i++) {
        l.files[i].name = strdup(names[i]);
        l.files[i].size = 10;
    }
    return l;
}

static char *selected(const hub_listing *l) {
    static char buf[2048];
    buf[0] = 0;
    for (size_t i = 0; i < l->nfiles; i++)
        if (l->files[i].selected) {
            if (buf[0]) strcat(buf, ",");
            strcat(buf, l->files[i].name);
        }
    return buf;
}

static const char *const REPO[] = {
    "README.md",
    "config.json",
    "consolidated.safetensors",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "original/consolidated.00.pth",
    "original/params.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "training_args.bin",
};
#define NREPO (sizeof REPO / sizeof REPO[0])
static const char *INDEX = "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"b\":"
                           "\"model-00002-of-00002.safetensors\"}}";

static void test_select_auto_safetensors_with_index(void **state) {
    (void)state;
    hub_listing l = make_listing(REPO, NREPO);
    mp_error err;
    bool need = false;
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_true(need); /* must read the index first */
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, INDEX, &need, &err), 0);
    assert_false(need);
    /* no consolidated (not in the index), no .bin, nothing under original/ */
    assert_string_equal(selected(&l),
                        "README.md,config.json,generation_config.json,"
                        "model-00001-of-00002.safetensors,model-00002-of-00002.safetensors,"
                        "model.safetensors.index.json,tokenizer.json");
    /* an index without weight_map leaves the choice alone */
    assert_int_equal(hub_select_files(&l, HUB_FMT_SAFETENSORS, NULL, 0, NULL, 0, "{}", &need, &err),
                     0);
    assert_non_null(strstr(selected(&l), "consolidated.safetensors"));
    hub_listing_free(&l);
}

static void test_select_pt_and_training_artifacts(void **state) {
    (void)state;
    const char *names[] = {"config.json",  "pytorch_model.bin", "training_args.bin",
                           "optimizer.pt", "my_scheduler.pt",   "tokenizer.model"};
    hub_listing l = make_listing(names, 6);
    mp_error err;
    bool need;
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l), "config.json,pytorch_model.bin,tokenizer.model");
    assert_int_equal(hub_select_files(&l, HUB_FMT_PT, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l), "config.json,pytorch_model.bin,tokenizer.model");
    /* safetensors finds nothing: refused rather than SGLang's fallback to .pt */
    assert_int_equal(hub_select_files(&l, HUB_FMT_SAFETENSORS, NULL, 0, NULL, 0, NULL, &need, &err),
                     -1);
    assert_string_equal(err.code, "file_not_found");
    assert_int_equal(hub_select_files(&l, HUB_FMT_ALL, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l),
                        "config.json,pytorch_model.bin,training_args.bin,optimizer.pt,"
                        "my_scheduler.pt,tokenizer.model");
    hub_listing_free(&l);

    const char *only_pt[] = {"config.json", "model.pt", "scaler.pt"};
    l = make_listing(only_pt, 3);
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l), "config.json,model.pt");
    hub_listing_free(&l);
}

static void test_select_gguf_patterns_and_consolidated(void **state) {
    (void)state;
    const char *names[] = {"config.json", "model-Q4_K_M.gguf", "model-Q8_0.gguf"};
    hub_listing l = make_listing(names, 3);
    mp_error err;
    bool need;
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, NULL, &need, &err), -1);
    assert_string_equal(err.code, "file_not_found");
    const char *allow[] = {"*Q4_K_M*", "config.json"};
    assert_int_equal(hub_select_files(&l, HUB_FMT_GGUF, allow, 2, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l), "config.json,model-Q4_K_M.gguf");
    const char *ign[] = {"*"};
    assert_int_equal(hub_select_files(&l, HUB_FMT_GGUF, NULL, 0, ign, 1, NULL, &need, &err), -1);
    hub_listing_free(&l);

    const char *mistral[] = {"config.json", "consolidated.safetensors", "model.safetensors"};
    l = make_listing(mistral, 3);
    assert_int_equal(hub_select_files(&l, HUB_FMT_AUTO, NULL, 0, NULL, 0, NULL, &need, &err), 0);
    assert_string_equal(selected(&l), "config.json,model.safetensors");
    hub_listing_free(&l);
}

static void test_load_format_names(void **state) {
    (void)state;
    hub_load_format f;
    assert_int_equal(hub_parse_load_format("gguf", &f), 0);
    assert_int_equal(f, HUB_FMT_GGUF);
    assert_int_equal(hub_parse_load_format("npcache", &f), -1);
    assert_int_equal(hub_parse_load_format(NULL, &f), -1);
    assert_true(hub_is_training_artifact("sub/optimizer.bin"));
    assert_false(hub_is_training_artifact("optimizer.bin.json"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fnmatch_python_semantics),
        cmocka_unit_test(test_pattern_filter),
        cmocka_unit_test(test_path_safe),
        cmocka_unit_test(test_cache_paths),
        cmocka_unit_test(test_repo_lock),
        cmocka_unit_test(test_retry_after),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_error_codes),
        cmocka_unit_test(test_space_margin),
        cmocka_unit_test(test_etag_and_range),
        cmocka_unit_test(test_parse_listing),
        cmocka_unit_test(test_select_auto_safetensors_with_index),
        cmocka_unit_test(test_select_pt_and_training_artifacts),
        cmocka_unit_test(test_select_gguf_patterns_and_consolidated),
        cmocka_unit_test(test_load_format_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
