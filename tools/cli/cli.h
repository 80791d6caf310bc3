/*
 * cli.h - the pieces of `modelprep`, the command-line client: an HTTP
 * client for the REST API (http.c), an incremental server-sent-events
 * parser (sse.c), progress bars and tables (render.c), and the follower
 * that streams a job's events until it ends (follow.c). The client talks
 * to modelprepd only through its API: nothing here calls the loader or the
 * store, so what it shows is what any other client would see.
 */
#ifndef MODELPREP_CLI_H
#define MODELPREP_CLI_H

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Exit statuses, as the README documents them. */
enum {
    CLI_EXIT_OK = 0,
    CLI_EXIT_FAILED = 1,       /* the job failed or was cancelled; an API error */
    CLI_EXIT_USAGE = 2,        /* bad arguments, or a request the server refused as invalid */
    CLI_EXIT_UNREACHABLE = 3,  /* no answer from the server */
    CLI_EXIT_INTERRUPTED = 130 /* a second Ctrl-C: the job was left running */
};

/* ---- http.c ------------------------------------------------------------------ */

typedef struct cli_client {
    char *base;  /* "http://host:port", no trailing slash */
    char *token; /* bearer token or NULL */
    char auth[600];
} cli_client;

/* Result of one request. `doc` is the parsed JSON body (NULL when the body
 * was empty or not JSON); `status` the HTTP status (0 when no answer). */
typedef struct cli_resp {
    long status;
    json_t *doc;
    char error[256]; /* transport error, or why the body was refused */
} cli_resp;

/* Transport outcome of cli_request. */
enum { CLI_HTTP_OK = 0, CLI_HTTP_UNREACHABLE = -1, CLI_HTTP_BAD_BODY = -2 };

int cli_client_init(cli_client *c, const char *url, const char *token);
void cli_client_free(cli_client *c);
/* One request; `body` (may be NULL) is sent as JSON. Fills `r` (free with
 * cli_resp_free). Bodies over 64 MiB are refused, not buffered. */
int cli_request(cli_client *c, const char *method, const char *path, json_t *body, cli_resp *r);
void cli_resp_free(cli_resp *r);
/* "HTTP 400: detail (field: message; ...)" from a problem document. */
void cli_problem_text(const cli_resp *r, char *out, size_t len);
/* Percent-encodes one path segment or query value. Caller frees. */
char *cli_escape(const char *s);

/* ---- sse.c --------------------------------------------------------------------- */

typedef void (*sse_event_fn)(void *arg, const char *kind, const char *data);

/* Incremental text/event-stream parser. A line longer than `max_line`
 * bytes is dropped whole (and counted in `dropped`), so a hostile or broken
 * server cannot make the client buffer without bound. */
typedef struct sse_parser {
    char *line;
    size_t len, cap, max_line;
    bool skipping;  /* inside an overlong line: discard up to its end */
    bool after_cr;  /* the last byte was a CR: a LF next is the same line end */
    bool event_bad; /* the event being built lost a line: deliver nothing */
    char kind[64];
    char *data;
    size_t dlen, dcap;
    bool have_data;
    unsigned long dropped;
    bool oom;
    sse_event_fn fn;
    void *arg;
} sse_parser;

void sse_init(sse_parser *p, size_t max_line, sse_event_fn fn, void *arg);
void sse_feed(sse_parser *p, const char *buf, size_t n);
void sse_free(sse_parser *p);

/* ---- render.c ------------------------------------------------------------------ */

void fmt_bytes(double n, char *out, size_t len);
void fmt_duration(double s, char *out, size_t len);
/* Seconds since the epoch of an RFC 3339 UTC time ("...Z"), -1 if not one. */
double parse_time(const char *s);
/* "HH:MM:SS" local time of an RFC 3339 string, or "-". */
void fmt_clock(const char *rfc3339, char *out, size_t len);
/* Duration of a job from its started_at to its finished_at (or now). */
void fmt_job_duration(json_t *job, char *out, size_t len);

/* A table printed with aligned columns. Cells are copied; NULL prints as
 * empty. table_init takes the header cells, table_row exactly ncols cells. */
#define CLI_TABLE_MAX_COLS 12
typedef struct cli_table {
    int ncols, nrows, cap;
    char **cells; /* nrows * ncols */
    int *width;
    bool oom;
} cli_table;

void table_init(cli_table *t, int ncols, ...);
void table_row(cli_table *t, ...); /* exactly ncols const char * */
void table_print(cli_table *t, FILE *f);
void table_free(cli_table *t);

/* One progress bar: a job, or a step of a prepare. */
typedef struct cli_bar {
    char label[96];
    char job[48];
    char state[16]; /* pending, queued, running, succeeded, failed, cancelled, skipped */
    char note[160]; /* message, skip reason or error */
    char unit[16];
    uint64_t done, total;
    double rate;
    bool changed;
    char printed[192]; /* the last plain line of this bar: never printed twice */
    int logs;          /* this job's logs printed (see follow.c) */
    bool ended;        /* its job was seen to end */
} cli_bar;

typedef enum { RENDER_TTY, RENDER_PLAIN, RENDER_QUIET } render_mode;

typedef struct cli_render {
    render_mode mode;
    FILE *out;
    int drawn; /* lines of bars on screen (tty) */
    double last_draw, last_plain;
    int cols;
} cli_render;

void render_init(cli_render *r, render_mode mode, FILE *out);
/* Redraws the bars: in place on a terminal (at most every 100 ms unless
 * `force`), else the changed ones as plain lines at most once a second. */
void render_bars(cli_render *r, cli_bar *bars, int n, bool force);
/* A line of text (a log, a state change) above the bars. */
void render_line(cli_render *r, cli_bar *bars, int n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Leaves the bars on screen as they are and stops redrawing them. */
void render_done(cli_render *r, cli_bar *bars, int n);

/* ---- follow.c ------------------------------------------------------------------ */

extern volatile sig_atomic_t cli_interrupts;

/* Follows `job` (its document, taken) until it ends: its event stream,
 * and for a prepare the streams of its running steps. On return *final is
 * the job's last document (caller frees) when the job ended. Returns an
 * exit status: OK when it succeeded, FAILED when it failed or was
 * cancelled, UNREACHABLE, INTERRUPTED (a second Ctrl-C). */
int follow_job(cli_client *c, json_t *job, render_mode mode, json_t **final);

#endif
