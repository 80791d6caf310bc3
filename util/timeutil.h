/* timeutil.h - wall-clock stamps for the API (RFC 3339 UTC) and a monotonic
 * clock for durations and rates. */
#ifndef MP_UTIL_TIMEUTIL_H
#define MP_UTIL_TIMEUTIL_H
#include <stddef.h>
#include <stdint.h>
/* "2026-11-29T01:52:00.123Z" into buf (>= 32 bytes). */
void time_rfc3339_now(char *buf, size_t len);
double time_mono(void);      /* seconds, monotonic */
uint64_t time_wall_ms(void); /* ms since epoch */
#endif
