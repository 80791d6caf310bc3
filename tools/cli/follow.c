/*
 * follow.c - following a job to its end: its event stream
 * (GET /v1/jobs/{id}/events, which replays the history first, so nothing
 * between the submission and the stream's opening is lost), and for a
 * prepare one more stream per running step, all on one curl multi handle in
 * one thread. Each event updates a bar; logs are printed above the bars.
 *
 * A stream that drops before the job ended is reopened (the job may still
 * be running behind a restarting proxy or server); the replayed logs we
 * already printed are skipped by count, since logs are kept in order. A
 * first Ctrl-C asks the server to cancel and keeps following, so the user
 * sees the job end. The cancel is sent 1.5 s after that Ctrl-C: a second
 * one within that time leaves the job running and returns (after it, the
 * client just stops waiting for the cancel to finish).
 */
#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/cli/cli.h"
#include "util/timeutil.h"

#define MAX_STREAMS 16
#define MAX_BARS 16
/* The longest event line we accept: a state event carries the whole job
 * document, an inspect result included, which stays far below this. */
#define MAX_EVENT_LINE (8u << 20)
#define UNREACHABLE_AFTER_S 15.0
#define CANCEL_GRACE_S 1.5
#define MAX_REOPENS 20

volatile sig_atomic_t cli_interrupts;

static void on_sigint(int sig) {
    (void)sig;
    if (cli_interrupts < 2) cli_interrupts++;
}

/* Ctrl-C is ours only while following; elsewhere it stops the client as
 * usual. No SA_RESTART: a Ctrl-C wakes the poll at once. */
static void catch_sigint(bool on, struct sigaction *old) {
    if (on) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sigint;
        sigemptyset(&sa.sa_mask);
        cli_interrupts = 0;
        sigaction(SIGINT, &sa, old);
    } else {
        sigaction(SIGINT, old, NULL);
    }
}

struct follower;

typedef struct stream {
    struct follower *f;
    CURL *h;
    struct curl_slist *hdrs;
    char job[48];
    char step[24]; /* the step type, for a child; "" for the job followed */
    sse_parser p;
    bool root;
    /* Logs of this job printed so far (the follower's or the bar's count):
     * a reopened stream replays the history, whose first `skip` logs were
     * printed already. Logs are kept in order, so counting is enough. */
    int *logs;
    int skip;
} stream;

typedef struct follower {
    cli_client *c;
    CURLM *m;
    stream *s[MAX_STREAMS];
    int ns;
    json_t *job; /* the followed job's latest document */
    bool prepare;
    bool steps_dirty;
    bool final;
    bool force_draw;
    int root_logs;
    int reopens; /* stream reopenings since the last event */
    cli_bar bars[MAX_BARS];
    int nbars;
    cli_render r;
    unsigned long bad_events;
} follower;

static bool is_final(const char *state) {
    return state &&
           (!strcmp(state, "succeeded") || !strcmp(state, "failed") || !strcmp(state, "cancelled"));
}

static const char *jstr(json_t *o, const char *k) {
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static uint64_t juint(json_t *o, const char *k) {
    json_int_t v = json_integer_value(json_object_get(o, k));
    return v > 0 ? (uint64_t)v : 0;
}

/* "type model", the model cut to its last path component or repo name. */
static void label_of(const char *type, const char *model, char *out, size_t len) {
    const char *slash = strrchr(model, '/');
    const char *base = model[0] == '/' && slash && slash[1] ? slash + 1 : model;
    snprintf(out, len, "%s %s", type, base);
}

static cli_bar *bar_for_job(follower *f, const char *id) {
    for (int i = 0; i < f->nbars; i++)
        if (f->bars[i].job[0] && strcmp(f->bars[i].job, id) == 0) return &f->bars[i];
    return NULL;
}

static void bar_set_state(cli_bar *b, const char *state) {
    if (strcmp(b->state, state) != 0) {
        snprintf(b->state, sizeof b->state, "%s", state);
        b->changed = true;
    }
}

static void bar_from_doc(cli_bar *b, json_t *doc) {
    bar_set_state(b, jstr(doc, "state"));
    json_t *err = json_object_get(doc, "error");
    if (json_is_object(err))
        snprintf(b->note, sizeof b->note, "%s: %s", jstr(err, "code"), jstr(err, "message"));
    json_t *p = json_object_get(doc, "progress");
    if (json_is_object(p)) {
        b->done = juint(p, "done");
        b->total = juint(p, "total");
        snprintf(b->unit, sizeof b->unit, "%s", jstr(p, "unit"));
    }
    b->changed = true;
}

/* The steps of a prepare become its bars; a bar keeps the progress it
 * already had while its step's state moves on. */
static void steps_to_bars(follower *f, json_t *steps) {
    size_t i;
    json_t *st;
    if (!json_is_array(steps)) return;
    json_array_foreach(steps, i, st) {
        if (i >= MAX_BARS) break;
        cli_bar *b = &f->bars[i];
        if ((int)i >= f->nbars) memset(b, 0, sizeof *b);
        label_of(jstr(st, "type"), jstr(st, "model"), b->label, sizeof b->label);
        const char *job = jstr(st, "job");
        if (strcmp(b->job, job) != 0) {
            snprintf(b->job, sizeof b->job, "%s", job);
            b->done = b->total = 0;
            b->rate = 0;
            b->logs = 0;
            b->ended = false;
        }
        const char *state = jstr(st, "state");
        if (!strcmp(state, "skipped")) snprintf(b->note, sizeof b->note, "%s", jstr(st, "reason"));
        /* The prepare's stream may lag behind the child's: a step whose job
         * was seen to end does not go back to running. */
        if (!b->ended || is_final(state)) bar_set_state(b, state);
    }
    f->nbars = (int)(json_array_size(steps) < MAX_BARS ? json_array_size(steps) : MAX_BARS);
    f->steps_dirty = true;
    f->force_draw = true;
}

static void on_event(void *arg, const char *kind, const char *data) {
    stream *s = arg;
    follower *f = s->f;
    f->reopens = 0;
    json_t *doc = json_loads(data, 0, NULL);
    if (!json_is_object(doc)) {
        f->bad_events++;
        json_decref(doc);
        return;
    }
    if (!strcmp(kind, "state")) {
        if (s->root) {
            json_decref(f->job);
            f->job = json_incref(doc);
            if (!f->prepare && f->nbars > 0) bar_from_doc(&f->bars[0], doc);
            if (f->prepare) steps_to_bars(f, json_object_get(doc, "steps"));
            if (is_final(jstr(doc, "state"))) f->final = true;
        } else {
            cli_bar *b = bar_for_job(f, s->job);
            if (b) bar_from_doc(b, doc);
            if (b && is_final(jstr(doc, "state"))) b->ended = true;
        }
        f->force_draw = true;
    } else if (!strcmp(kind, "progress")) {
        cli_bar *b = s->root && !f->prepare ? &f->bars[0]
                     : !s->root             ? bar_for_job(f, s->job)
                                            : NULL;
        if (b) {
            b->done = juint(doc, "done");
            b->total = juint(doc, "total");
            b->rate = json_number_value(json_object_get(doc, "rate"));
            snprintf(b->unit, sizeof b->unit, "%s", jstr(doc, "unit"));
            snprintf(b->note, sizeof b->note, "%s", jstr(doc, "message"));
            if (!strcmp(b->state, "queued") || !b->state[0]) bar_set_state(b, "running");
            b->changed = true;
        }
    } else if (!strcmp(kind, "log")) {
        if (s->skip > 0) {
            s->skip--; /* printed before the stream was reopened */
        } else {
            (*s->logs)++;
            render_line(&f->r, f->bars, f->nbars, "%s%s%s[%s] %s", s->step, s->step[0] ? ": " : "",
                        "", jstr(doc, "level"), jstr(doc, "message"));
        }
    } else if (!strcmp(kind, "steps") && s->root) {
        steps_to_bars(f, json_object_get(doc, "steps"));
    } else if (!strcmp(kind, "error")) {
        render_line(&f->r, f->bars, f->nbars, "server: %s", jstr(doc, "message"));
    }
    json_decref(doc);
}

static size_t on_data(char *p, size_t size, size_t n, void *arg) {
    stream *s = arg;
    long code = 0;
    curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &code);
    if (code != 200) return 0; /* not an event stream: stop, the caller asks why */
    sse_feed(&s->p, p, size * n);
    return size * n;
}

static void stream_close(follower *f, stream *s) {
    for (int i = 0; i < f->ns; i++) {
        if (f->s[i] == s) {
            f->s[i] = f->s[--f->ns];
            break;
        }
    }
    if (s->h) {
        curl_multi_remove_handle(f->m, s->h);
        curl_easy_cleanup(s->h);
    }
    curl_slist_free_all(s->hdrs);
    sse_free(&s->p);
    free(s);
}

static stream *stream_open(follower *f, const char *job, const char *step, bool root, int *logs) {
    if (f->ns >= MAX_STREAMS) return NULL;
    stream *s = calloc(1, sizeof *s);
    char *id = cli_escape(job), *url = NULL;
    if (!s || !id || asprintf(&url, "%s/v1/jobs/%s/events", f->c->base, id) < 0) {
        free(s);
        free(id);
        return NULL;
    }
    free(id);
    s->f = f;
    s->root = root;
    s->logs = logs;
    s->skip = *logs;
    snprintf(s->job, sizeof s->job, "%s", job);
    snprintf(s->step, sizeof s->step, "%s", step);
    sse_init(&s->p, MAX_EVENT_LINE, on_event, s);
    s->h = curl_easy_init();
    struct curl_slist *t;
    if (f->c->token && (t = curl_slist_append(s->hdrs, f->c->auth))) s->hdrs = t;
    if ((t = curl_slist_append(s->hdrs, "Accept: text/event-stream"))) s->hdrs = t;
    if (!s->h) {
        free(url);
        stream_close(f, s);
        return NULL;
    }
    curl_easy_setopt(s->h, CURLOPT_URL, url);
    curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, s->hdrs);
    curl_easy_setopt(s->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(s->h, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(s->h, CURLOPT_PRIVATE, s);
    curl_easy_setopt(s->h, CURLOPT_CONNECTTIMEOUT, 10L);
    /* The server sends a keepalive every 15 s: a minute of silence is a
     * dead connection, not an idle job. */
    curl_easy_setopt(s->h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(s->h, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(s->h, CURLOPT_NOSIGNAL, 1L);
    free(url);
    if (curl_multi_add_handle(f->m, s->h) != CURLM_OK) {
        stream_close(f, s);
        return NULL;
    }
    f->s[f->ns++] = s;
    return s;
}

static stream *stream_for(follower *f, const char *job) {
    for (int i = 0; i < f->ns; i++)
        if (strcmp(f->s[i]->job, job) == 0) return f->s[i];
    return NULL;
}

/* Opens a stream for every running step that has none. Outside the curl
 * callbacks: a handle may not be added to the multi from inside one. */
static void sync_child_streams(follower *f) {
    if (!f->steps_dirty || !f->job) return;
    f->steps_dirty = false;
    for (int i = 0; i < f->nbars; i++) {
        cli_bar *b = &f->bars[i];
        if (!b->job[0] || b->ended || strcmp(b->state, "running") != 0 || stream_for(f, b->job))
            continue;
        char step[24];
        snprintf(step, sizeof step, "%.*s", (int)strcspn(b->label, " "), b->label);
        if (!stream_open(f, b->job, step, false, &b->logs))
            render_line(&f->r, f->bars, f->nbars, "cannot follow step %s", b->job);
    }
}

/* The job's stream ended before the job did: ask where the job is, and
 * reopen it unless it ended. Returns 0 to go on, else an exit status. */
static int root_dropped(follower *f, stream *s, double *unreachable_since) {
    char path[128];
    char *id = cli_escape(s->job);
    if (!id) return CLI_EXIT_FAILED;
    snprintf(path, sizeof path, "/v1/jobs/%s", id);
    free(id);
    cli_resp r;
    int rc = cli_request(f->c, "GET", path, NULL, &r);
    if (rc == CLI_HTTP_UNREACHABLE) {
        double now = time_mono();
        if (*unreachable_since == 0) *unreachable_since = now;
        if (now - *unreachable_since > UNREACHABLE_AFTER_S) {
            render_done(&f->r, f->bars, f->nbars);
            fprintf(stderr, "modelprep: %s\n", r.error);
            return CLI_EXIT_UNREACHABLE;
        }
        struct timespec ts = {0, 500 * 1000 * 1000};
        nanosleep(&ts, NULL);
    } else {
        *unreachable_since = 0;
    }
    if (rc == CLI_HTTP_OK && r.status == 200 && json_is_object(r.doc)) {
        if (is_final(jstr(r.doc, "state"))) {
            json_decref(f->job);
            f->job = json_incref(r.doc);
            f->final = true;
            cli_resp_free(&r);
            return 0;
        }
    } else if (rc != CLI_HTTP_UNREACHABLE) {
        char msg[512];
        if (rc == CLI_HTTP_OK)
            cli_problem_text(&r, msg, sizeof msg);
        else
            snprintf(msg, sizeof msg, "%s", r.error);
        cli_resp_free(&r);
        render_done(&f->r, f->bars, f->nbars);
        fprintf(stderr, "modelprep: cannot follow job %s: %s\n", s->job, msg);
        return CLI_EXIT_FAILED;
    }
    cli_resp_free(&r);
    /* A stream that keeps failing while the job goes on (a proxy that cuts
     * it, a server refusing streams): not forever. */
    if (rc != CLI_HTTP_UNREACHABLE && ++f->reopens > MAX_REOPENS) {
        render_done(&f->r, f->bars, f->nbars);
        fprintf(stderr, "modelprep: the event stream of job %s keeps failing; it is still %s\n",
                s->job, jstr(f->job, "state"));
        return CLI_EXIT_FAILED;
    }
    if (rc != CLI_HTTP_UNREACHABLE && f->reopens > 1) {
        struct timespec ts = {0, 500 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    char job[48];
    snprintf(job, sizeof job, "%s", s->job);
    stream_close(f, s);
    if (!stream_open(f, job, "", true, &f->root_logs)) {
        fprintf(stderr, "modelprep: cannot open the event stream again\n");
        return CLI_EXIT_FAILED;
    }
    return 0;
}

static void ask_cancel(follower *f, const char *id) {
    char path[128];
    char *e = cli_escape(id);
    if (!e) return;
    snprintf(path, sizeof path, "/v1/jobs/%s", e);
    free(e);
    cli_resp r;
    int rc = cli_request(f->c, "DELETE", path, NULL, &r);
    if (rc == CLI_HTTP_OK && (r.status == 202 || r.status == 409))
        render_line(&f->r, f->bars, f->nbars, "cancel requested for job %s", id);
    else
        render_line(&f->r, f->bars, f->nbars, "could not cancel job %s: %s", id,
                    rc == CLI_HTTP_OK ? "the server refused" : r.error);
    cli_resp_free(&r);
}

int follow_job(cli_client *c, json_t *job, render_mode mode, json_t **final) {
    *final = NULL;
    follower *f = calloc(1, sizeof *f);
    if (!f) {
        json_decref(job);
        return CLI_EXIT_FAILED;
    }
    f->c = c;
    f->job = job;
    render_init(&f->r, mode, stdout);
    char id[48];
    snprintf(id, sizeof id, "%s", jstr(job, "id"));
    f->prepare = strcmp(jstr(job, "type"), "prepare") == 0;
    if (f->prepare) {
        steps_to_bars(f, json_object_get(job, "steps"));
    } else {
        f->nbars = 1;
        label_of(jstr(job, "type"), jstr(job, "model"), f->bars[0].label, sizeof f->bars[0].label);
        snprintf(f->bars[0].job, sizeof f->bars[0].job, "%s", id);
        bar_from_doc(&f->bars[0], job);
    }
    if (is_final(jstr(job, "state"))) f->final = true;
    int status = 0;
    f->m = curl_multi_init();
    if (!f->m || (!f->final && !stream_open(f, id, "", true, &f->root_logs))) {
        fprintf(stderr, "modelprep: cannot open the event stream\n");
        status = CLI_EXIT_FAILED;
    }
    double unreachable_since = 0;
    bool cancel_sent = false;
    struct sigaction old_int;
    catch_sigint(true, &old_int);
    double ctrlc_at = 0;
    while (!status && !f->final) {
        if (cli_interrupts >= 2) {
            render_done(&f->r, f->bars, f->nbars);
            if (cancel_sent)
                fprintf(stderr,
                        "modelprep: stopped following job %s (its cancel was requested); "
                        "modelprep watch %s follows it again\n",
                        id, id);
            else
                fprintf(stderr,
                        "modelprep: left job %s running; follow it with: modelprep watch %s\n", id,
                        id);
            status = CLI_EXIT_INTERRUPTED;
            break;
        }
        /* The cancel goes out after a short grace, so that a second Ctrl-C
         * can still mean "leave it running" rather than come too late. */
        if (cli_interrupts == 1 && !cancel_sent) {
            double now = time_mono();
            if (ctrlc_at == 0) {
                ctrlc_at = now;
                render_line(&f->r, f->bars, f->nbars,
                            "cancelling job %s in %.1f s (Ctrl-C again to leave it running)", id,
                            CANCEL_GRACE_S);
            } else if (now - ctrlc_at >= CANCEL_GRACE_S) {
                cancel_sent = true;
                ask_cancel(f, id);
            }
        }
        int running = 0;
        curl_multi_perform(f->m, &running);
        CURLMsg *msg;
        int left;
        while (!status && (msg = curl_multi_info_read(f->m, &left))) {
            if (msg->msg != CURLMSG_DONE) continue;
            stream *s = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            if (!s) continue;
            if (s->p.dropped)
                render_line(&f->r, f->bars, f->nbars,
                            "modelprep: %lu oversized event line(s) from the server were dropped",
                            s->p.dropped);
            if (!s->root) {
                stream_close(f, s);
                f->steps_dirty = true;
            } else if (!f->final) {
                status = root_dropped(f, s, &unreachable_since);
            }
        }
        sync_child_streams(f);
        render_bars(&f->r, f->bars, f->nbars, f->force_draw);
        f->force_draw = false;
        if (!status && !f->final) curl_multi_poll(f->m, NULL, 0, 100, NULL);
    }
    catch_sigint(false, &old_int);
    if (status != CLI_EXIT_INTERRUPTED) render_done(&f->r, f->bars, f->nbars);
    if (f->bad_events)
        fprintf(stderr, "modelprep: %lu event(s) from the server were not JSON and were skipped\n",
                f->bad_events);
    while (f->ns > 0)
        stream_close(f, f->s[0]);
    if (f->m) curl_multi_cleanup(f->m);
    if (!status) {
        const char *state = jstr(f->job, "state");
        status = !strcmp(state, "succeeded") ? CLI_EXIT_OK : CLI_EXIT_FAILED;
    }
    if (f->final) {
        *final = f->job;
        f->job = NULL;
    }
    json_decref(f->job);
    free(f);
    return status;
}
