/*
 * test_cli_sse.c - the client's event-stream parser (tools/cli/sse.c):
 * events split anywhere (fed byte by byte), LF, CRLF and lone CR line ends,
 * comments and unknown fields, multi-line data, the default kind, and the
 * bounds: an overlong data line or event kind drops that event (counted)
 * and the next event still parses.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/cli/cli.h"

typedef struct seen {
    int n;
    char kind[8][64];
    char data[8][256];
} seen;

static void on_event(void *arg, const char *kind, const char *data) {
    seen *s = arg;
    if (s->n < 8) {
        snprintf(s->kind[s->n], sizeof s->kind[0], "%s", kind);
        snprintf(s->data[s->n], sizeof s->data[0], "%s", data);
    }
    s->n++;
}

/* Feeds `text` whole and byte by byte: both must give the same events. */
static void parse_both(const char *text, size_t max_line, seen *whole, unsigned long *dropped) {
    seen bytes = {0};
    sse_parser p;
    memset(whole, 0, sizeof *whole);
    sse_init(&p, max_line, on_event, whole);
    sse_feed(&p, text, strlen(text));
    *dropped = p.dropped;
    sse_free(&p);
    sse_init(&p, max_line, on_event, &bytes);
    for (size_t i = 0; text[i]; i++)
        sse_feed(&p, text + i, 1);
    assert_int_equal(p.dropped, *dropped);
    sse_free(&p);
    assert_int_equal(bytes.n, whole->n);
    for (int i = 0; i < whole->n && i < 8; i++) {
        assert_string_equal(bytes.kind[i], whole->kind[i]);
        assert_string_equal(bytes.data[i], whole->data[i]);
    }
}

static void test_line_ends_and_fields(void **state) {
    (void)state;
    seen s;
    unsigned long dropped;
    parse_both(": connected\nretry: 2000\n\n"
               "id: 7\nevent: state\ndata: {\"a\":1}\n\n"
               "event: log\r\ndata: one\r\ndata: two\r\n\r\n"
               "event:progress\rdata:x\r\r"
               "data: no kind\n\n"
               "event: lonely\n\n"
               "bogus: field\ndata:  two spaces\n\n",
               1024, &s, &dropped);
    assert_int_equal(dropped, 0);
    assert_int_equal(s.n, 5);
    assert_string_equal(s.kind[0], "state");
    assert_string_equal(s.data[0], "{\"a\":1}");
    assert_string_equal(s.kind[1], "log");
    assert_string_equal(s.data[1], "one\ntwo");
    assert_string_equal(s.kind[2], "progress");
    assert_string_equal(s.data[2], "x");
    assert_string_equal(s.kind[3], "message");
    assert_string_equal(s.data[3], "no kind");
    /* an event with no data is not delivered; only one leading space goes */
    assert_string_equal(s.data[4], " two spaces");
}

static void test_overlong_lines_drop_their_event(void **state) {
    (void)state;
    char *text = malloc(4096);
    assert_non_null(text);
    char big[300];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    snprintf(text, 4096,
             "event: log\ndata: %s\n\n"        /* a data line over the bound */
             "event: log\ndata: short\n\n"     /* the next one is fine */
             "event: %s\ndata: y\n\n"          /* a kind over 63 bytes */
             "event: a\ndata: 1\ndata: %s\n\n" /* an event that grows too big */
             "event: end\ndata: ok\n\n",
             big, big, big);
    seen s;
    unsigned long dropped;
    parse_both(text, 256, &s, &dropped);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.data[0], "short");
    assert_string_equal(s.kind[1], "end");
    assert_int_equal(dropped, 3);
    free(text);
}

static void test_no_trailing_blank_line_delivers_nothing(void **state) {
    (void)state;
    seen s;
    unsigned long dropped;
    parse_both("event: state\ndata: {}\n", 64, &s, &dropped);
    assert_int_equal(s.n, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_line_ends_and_fields),
        cmocka_unit_test(test_overlong_lines_drop_their_event),
        cmocka_unit_test(test_no_trailing_blank_line_delivers_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
