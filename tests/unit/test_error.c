/*
 * test_error.c - util/error: messages may be built from the error they
 * replace (aliasing), context is added in front without losing the
 * callee's words, codes are kept or reclassified as asked, and truncation
 * stays inside the buffers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "util/error.h"

static void test_err_may_read_itself(void **state) {
    (void)state;
    mp_error e = {0};
    mp_err(&e, "oom", "arena of 4096 bytes");
    /* The pattern the load path used: the message is an argument. */
    mp_err(&e, "insufficient_device_memory", "device %d: %s", 3, e.message);
    assert_string_equal(e.code, "insufficient_device_memory");
    assert_string_equal(e.message, "device 3: arena of 4096 bytes");
    mp_err(&e, e.code, "%s", e.message);
    assert_string_equal(e.code, "insufficient_device_memory");
    assert_string_equal(e.message, "device 3: arena of 4096 bytes");
}

static void test_wrap_keeps_code_and_field(void **state) {
    (void)state;
    mp_error e = {0};
    mp_err_field(&e, "params.dtype", "bad_param", "unknown dtype");
    assert_int_equal(mp_err_wrap(&e, NULL, "tensor '%s'", "w"), -1);
    assert_string_equal(e.code, "bad_param");
    assert_string_equal(e.field, "params.dtype");
    assert_string_equal(e.message, "tensor 'w': unknown dtype");
    mp_err_wrap(&e, NULL, "%s", "model.safetensors");
    assert_string_equal(e.message, "model.safetensors: tensor 'w': unknown dtype");
}

static void test_wrap_reclassifies(void **state) {
    (void)state;
    mp_error e = {0};
    mp_err(&e, "insufficient_memory", "pinned staging of 64 MiB");
    mp_err_wrap(&e, "insufficient_host_memory", "staging");
    assert_string_equal(e.code, "insufficient_host_memory");
    assert_string_equal(e.message, "staging: pinned staging of 64 MiB");
}

static void test_wrap_of_empty_and_null(void **state) {
    (void)state;
    mp_error e = {0};
    mp_err_wrap(&e, NULL, "reading %s", "x");
    assert_string_equal(e.message, "reading x");
    assert_string_equal(e.code, "error"); /* never an empty code */
    assert_int_equal(mp_err_wrap(NULL, NULL, "ignored"), -1);
    assert_int_equal(mp_err(NULL, "c", "ignored"), -1);
}

static void test_truncation_stays_inside(void **state) {
    (void)state;
    mp_error e = {0};
    char big[2000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    mp_err(&e, big, "%s", big);
    assert_int_equal(strlen(e.code), sizeof e.code - 1);
    assert_int_equal(strlen(e.message), sizeof e.message - 1);
    mp_err_wrap(&e, NULL, "%s", "prefix");
    assert_int_equal(strlen(e.message), sizeof e.message - 1);
    assert_memory_equal(e.message, "prefix: aaa", 11);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_err_may_read_itself),
        cmocka_unit_test(test_wrap_keeps_code_and_field),
        cmocka_unit_test(test_wrap_reclassifies),
        cmocka_unit_test(test_wrap_of_empty_and_null),
        cmocka_unit_test(test_truncation_stays_inside),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
