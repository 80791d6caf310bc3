/*
 * render.c - what the client prints: byte counts, durations and times,
 * aligned tables, and progress bars. On a terminal the bars are redrawn in
 * place (cursor up, clear line) and each line is cut to the terminal's
 * width, because a wrapped line would break the cursor arithmetic. When
 * stdout is a file or a pipe, a bar is a plain line, at most once a second,
 * so logs of a long download stay readable.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "tools/cli/cli.h"
#include "util/timeutil.h"

void fmt_bytes(double n, char *out, size_t len) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (!isfinite(n) || n < 0) {
        snprintf(out, len, "-");
        return;
    }
    int i = 0;
    while (n >= 1024 && i < 5)
        n /= 1024, i++;
    if (i == 0)
        snprintf(out, len, "%.0f B", n);
    else
        snprintf(out, len, n < 10 ? "%.2f %s" : "%.1f %s", n, units[i]);
}

void fmt_duration(double s, char *out, size_t len) {
    if (!isfinite(s) || s < 0) {
        snprintf(out, len, "-");
    } else if (s < 1) {
        snprintf(out, len, "%.0fms", s * 1000);
    } else if (s < 60) {
        snprintf(out, len, "%.1fs", s);
    } else if (s < 3600) {
        snprintf(out, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    } else {
        snprintf(out, len, "%dh%02dm", (int)(s / 3600), ((int)s % 3600) / 60);
    }
}

double parse_time(const char *s) {
    if (!s) return -1;
    struct tm tm = {0};
    const char *rest = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!rest) return -1;
    double frac = 0;
    if (*rest == '.') {
        char *end;
        frac = strtod(rest, &end);
        rest = end;
    }
    if (*rest != 'Z') return -1;
    return (double)timegm(&tm) + frac;
}

void fmt_clock(const char *rfc3339, char *out, size_t len) {
    double t = parse_time(rfc3339);
    if (t < 0) {
        snprintf(out, len, "-");
        return;
    }
    time_t tt = (time_t)t;
    struct tm tm;
    localtime_r(&tt, &tm);
    strftime(out, len, "%m-%d %H:%M:%S", &tm);
}

void fmt_job_duration(json_t *job, char *out, size_t len) {
    double a = parse_time(json_string_value(json_object_get(job, "started_at")));
    double b = parse_time(json_string_value(json_object_get(job, "finished_at")));
    if (a < 0) {
        snprintf(out, len, "-");
        return;
    }
    if (b < 0) b = (double)time_wall_ms() / 1000.0;
    fmt_duration(b - a, out, len);
}

/* ---- tables -------------------------------------------------------------------- */

static void table_rowv(cli_table *t, const char *const *cells) {
    if (t->oom) return;
    if (t->nrows == t->cap) {
        int cap = t->cap ? t->cap * 2 : 16;
        char **c = realloc(t->cells, (size_t)cap * (size_t)t->ncols * sizeof *c);
        if (!c) {
            t->oom = true;
            return;
        }
        t->cells = c;
        t->cap = cap;
    }
    char **row = t->cells + (size_t)t->nrows * (size_t)t->ncols;
    for (int i = 0; i < t->ncols; i++) {
        row[i] = strdup(cells[i] ? cells[i] : "");
        if (!row[i]) t->oom = true;
        int w = row[i] ? (int)strlen(row[i]) : 0;
        if (w > t->width[i]) t->width[i] = w;
    }
    t->nrows++; /* a row with a NULL cell is freed with the table */
}

void table_init(cli_table *t, int ncols, ...) {
    memset(t, 0, sizeof *t);
    if (ncols < 1 || ncols > CLI_TABLE_MAX_COLS) {
        t->oom = true;
        return;
    }
    t->ncols = ncols;
    t->width = calloc((size_t)ncols, sizeof *t->width);
    if (!t->width) {
        t->oom = true;
        return;
    }
    const char *cells[CLI_TABLE_MAX_COLS];
    va_list ap;
    va_start(ap, ncols);
    for (int i = 0; i < ncols; i++)
        cells[i] = va_arg(ap, const char *);
    va_end(ap);
    table_rowv(t, cells);
}

void table_row(cli_table *t, ...) {
    if (t->oom) return;
    const char *cells[CLI_TABLE_MAX_COLS];
    va_list ap;
    va_start(ap, t);
    for (int i = 0; i < t->ncols; i++)
        cells[i] = va_arg(ap, const char *);
    va_end(ap);
    table_rowv(t, cells);
}

void table_print(cli_table *t, FILE *f) {
    if (t->oom) {
        fprintf(stderr, "modelprep: out of memory\n");
        return;
    }
    for (int r = 0; r < t->nrows; r++) {
        char **row = t->cells + (size_t)r * (size_t)t->ncols;
        for (int i = 0; i < t->ncols; i++) {
            if (i + 1 == t->ncols)
                fprintf(f, "%s\n", row[i]);
            else
                fprintf(f, "%-*s  ", t->width[i], row[i]);
        }
    }
}

void table_free(cli_table *t) {
    for (int r = 0; r < t->nrows && t->cells; r++)
        for (int i = 0; i < t->ncols; i++)
            free(t->cells[(size_t)r * (size_t)t->ncols + (size_t)i]);
    free(t->cells);
    free(t->width);
    memset(t, 0, sizeof *t);
}

/* ---- progress bars --------------------------------------------------------------- */

/* The terminal's width, asked again at each redraw: it may have been
 * resized while a job ran. */
static void query_cols(cli_render *r) {
    struct winsize ws;
    if (r->mode == RENDER_TTY && ioctl(fileno(r->out), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        r->cols = ws.ws_col;
}

void render_init(cli_render *r, render_mode mode, FILE *out) {
    memset(r, 0, sizeof *r);
    r->mode = mode;
    r->out = out;
    r->cols = 100;
    query_cols(r);
}

static bool final_state(const char *s) {
    return !strcmp(s, "succeeded") || !strcmp(s, "failed") || !strcmp(s, "cancelled") ||
           !strcmp(s, "skipped");
}

/* One bar as text: label, bar, bytes, rate, ETA, or its end state. */
static void bar_text(const cli_bar *b, int cols, bool tty, char *out, size_t len) {
    char done[32], total[32], rate[32], eta[32];
    bool bytes = strcmp(b->unit, "bytes") == 0;
    if (bytes) {
        fmt_bytes((double)b->done, done, sizeof done);
        fmt_bytes((double)b->total, total, sizeof total);
    } else {
        snprintf(done, sizeof done, "%llu", (unsigned long long)b->done);
        snprintf(total, sizeof total, "%llu %s", (unsigned long long)b->total, b->unit);
    }
    int n = snprintf(out, len, "%-28.28s ", b->label);
    if (n < 0 || (size_t)n >= len) return;
    if (!strcmp(b->state, "pending") || !strcmp(b->state, "queued")) {
        snprintf(out + n, len - (size_t)n, "%s", b->state);
    } else if (!strcmp(b->state, "skipped")) {
        snprintf(out + n, len - (size_t)n, "skipped  %s", b->note);
    } else if (final_state(b->state)) {
        const char *mark = !strcmp(b->state, "succeeded") ? "done" : b->state;
        /* A cancel's error says only that it was cancelled. */
        if (!strcmp(b->state, "cancelled")) {
            snprintf(out + n, len - (size_t)n, "cancelled");
            goto cut;
        }
        if (b->total && !strcmp(b->state, "succeeded"))
            snprintf(out + n, len - (size_t)n, "%-9s %s", mark, total);
        else
            snprintf(out + n, len - (size_t)n, "%-9s %s", mark, b->note);
    } else {
        double frac = b->total ? (double)b->done / (double)b->total : 0;
        if (frac > 1) frac = 1;
        int width = cols >= 100 ? 30 : cols >= 80 ? 20 : 10;
        char bar[64];
        int fill = (int)(frac * width);
        for (int i = 0; i < width; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[width] = 0;
        rate[0] = eta[0] = 0;
        if (b->rate > 0) {
            if (bytes) {
                fmt_bytes(b->rate, rate, sizeof rate - 2);
                strcat(rate, "/s");
            } else {
                snprintf(rate, sizeof rate, "%.1f/s", b->rate);
            }
            if (b->total > b->done) {
                char d[24];
                fmt_duration((double)(b->total - b->done) / b->rate, d, sizeof d);
                snprintf(eta, sizeof eta, "ETA %s", d);
            }
        }
        if (b->total)
            snprintf(out + n, len - (size_t)n, "[%s] %3d%% %s/%s %s %s", bar, (int)(frac * 100),
                     done, total, rate, eta);
        else
            snprintf(out + n, len - (size_t)n, "%s %s", b->state, b->note);
    }
cut:
    (void)tty;
    /* Never wider than the terminal: a wrapped line would throw off the
     * count of lines to move up by. */
    size_t max = cols > 1 ? (size_t)cols - 1 : 1;
    if (strlen(out) > max) out[max] = 0;
}

static void tty_clear(cli_render *r) {
    /* \r first: a ^C echoed by the terminal moved the cursor off column 0,
     * and [J clears only from the cursor on. */
    if (r->drawn > 0) fprintf(r->out, "\r\x1b[%dA\x1b[J", r->drawn);
    r->drawn = 0;
}

static void tty_draw(cli_render *r, cli_bar *bars, int n) {
    char line[512];
    query_cols(r);
    for (int i = 0; i < n; i++) {
        bar_text(&bars[i], r->cols, true, line, sizeof line);
        fprintf(r->out, "\r\x1b[2K%s\n", line);
        bars[i].changed = false;
    }
    r->drawn = n;
    fflush(r->out);
}

void render_bars(cli_render *r, cli_bar *bars, int n, bool force) {
    double now = time_mono();
    if (r->mode == RENDER_QUIET) return;
    if (r->mode == RENDER_TTY) {
        if (!force && now - r->last_draw < 0.1) return;
        r->last_draw = now;
        tty_clear(r);
        tty_draw(r, bars, n);
        return;
    }
    if (!force && now - r->last_plain < 1.0) return;
    bool any = false;
    char line[512];
    for (int i = 0; i < n; i++) {
        if (!bars[i].changed) continue;
        bar_text(&bars[i], 160, false, line, sizeof line);
        /* Trailing blanks of the fixed-width columns mean nothing in a log. */
        size_t l = strlen(line);
        while (l && line[l - 1] == ' ')
            line[--l] = 0;
        bars[i].changed = false;
        if (strncmp(bars[i].printed, line, sizeof bars[i].printed - 1) == 0) continue;
        snprintf(bars[i].printed, sizeof bars[i].printed, "%s", line);
        fprintf(r->out, "%s\n", line);
        any = true;
    }
    if (any) {
        r->last_plain = now;
        fflush(r->out);
    }
}

void render_line(cli_render *r, cli_bar *bars, int n, const char *fmt, ...) {
    if (r->mode == RENDER_QUIET) return;
    if (r->mode == RENDER_TTY) tty_clear(r);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(r->out, fmt, ap);
    va_end(ap);
    fputc('\n', r->out);
    if (r->mode == RENDER_TTY) tty_draw(r, bars, n);
    fflush(r->out);
}

void render_done(cli_render *r, cli_bar *bars, int n) {
    if (r->mode == RENDER_TTY) {
        tty_clear(r);
        tty_draw(r, bars, n);
        r->drawn = 0;
    } else {
        render_bars(r, bars, n, true);
    }
}
