/* log.c - see log.h. Each line is formatted whole and written with one
 * fputs so lines from different threads never interleave. */
#include "server/log.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "util/timeutil.h"

void mp_log(const mp_logger *lg, const char *level, const char *job_id, const char *fmt, ...) {
    char msg[2048], ts[40];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    time_rfc3339_now(ts, sizeof ts);
    if (lg && lg->json) {
        json_t *o = json_pack("{s:s,s:s,s:s}", "ts", ts, "level", level, "msg", msg);
        if (!o) return;
        if (job_id) json_object_set_new(o, "job_id", json_string(job_id));
        char *line = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!line) return;
        fprintf(stderr, "%s\n", line);
        free(line);
    } else {
        /* One event, one line: control characters (a newline in an error
         * text, a decoded %0A in a logged path) must not start another. */
        for (char *c = msg; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = ' ';
        char line[2400];
        snprintf(line, sizeof line, "%s %-5s %s%s%s\n", ts, level, job_id ? job_id : "",
                 job_id ? " " : "", msg);
        fputs(line, stderr);
    }
}
