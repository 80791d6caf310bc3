/*
 * test_crc32c.c - CRC-32C: the standard check value, and the three-stream
 * hardware path (joined by the tabulated zero-block shift) agreeing with the
 * plain table-driven one for every length, alignment and chunking.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "util/crc32c.h"

static void test_check_value(void **state) {
    (void)state;
    crc32c_tab t;
    crc32c_init(&t);
    assert_int_equal(crc32c(&t, "123456789", 9), 0xE3069283u);
    assert_int_equal(crc32c(&t, "", 0), 0);
    t.hw = false;
    assert_int_equal(crc32c(&t, "123456789", 9), 0xE3069283u);
}

static void test_paths_agree(void **state) {
    (void)state;
    crc32c_tab hw, sw;
    crc32c_init(&hw);
    sw = hw;
    sw.hw = false;
    size_t n = 5 * 3 * CRC32C_LANE + 77;
    unsigned char *buf = malloc(n + 8);
    assert_non_null(buf);
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n + 8; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = (unsigned char)x;
    }
    size_t lens[] = {0,
                     1,
                     7,
                     8,
                     9,
                     4095,
                     3 * CRC32C_LANE - 1,
                     3 * CRC32C_LANE,
                     3 * CRC32C_LANE + 1,
                     2 * 3 * CRC32C_LANE + 13,
                     n};
    for (size_t a = 0; a < 8; a++)
        for (size_t k = 0; k < sizeof lens / sizeof *lens; k++)
            assert_int_equal(crc32c(&hw, buf + a, lens[k]), crc32c(&sw, buf + a, lens[k]));
    /* any chunking gives the same register */
    uint32_t whole = crc32c_update(&hw, ~0u, buf, n), parts = ~0u;
    size_t steps[] = {1, 4096, 12289, 3, 50000};
    for (size_t o = 0, s = 0; o < n; s++) {
        size_t k = steps[s % 5] < n - o ? steps[s % 5] : n - o;
        parts = crc32c_update(&hw, parts, buf + o, k);
        o += k;
    }
    assert_int_equal(whole, parts);
    free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_value),
        cmocka_unit_test(test_paths_agree),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
