/* log.h - one line per event on stderr, as text or JSON (--log-format),
 * with a level and, when there is one, the job id. */
#ifndef MP_SERVER_LOG_H
#define MP_SERVER_LOG_H
#include <stdbool.h>
typedef struct mp_logger {
    bool json;
} mp_logger;
void mp_log(const mp_logger *lg, const char *level, const char *job_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#endif
