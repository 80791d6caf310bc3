/* hub_curl.h - libcurl plumbing shared by hub_http.c and hub_transfer.c (not
 * for use outside loader/hub/). */
#ifndef MP_LOADER_HUB_CURL_H
#define MP_LOADER_HUB_CURL_H

#include <curl/curl.h>

#include "loader/hub/hub.h"

/* The response headers the hub protocol uses. Reset at each status line, so
 * after redirects it holds the last response's. */
typedef struct hub_hdrs {
    char x_error_code[64];
    char retry_after[64];
    char linked_etag[96];
    char etag[96];
    char repo_commit[48];
    char content_range[96];
    long long linked_size; /* -1 when absent */
} hub_hdrs;

size_t hub_header_cb(char *buf, size_t size, size_t n, void *arg);
void hub_hdrs_reset(hub_hdrs *h);

/* Options every request gets: timeouts, user agent, no signals, keepalive.
 * The header list (Accept-Encoding identity, and the bearer token when
 * with_auth) is built into *list; the caller frees it after the transfer. */
int hub_curl_setup(CURL *e, const hub_conn_opts *c, bool with_auth, struct curl_slist **list,
                   mp_error *err);
/* Sleeps up to s seconds in small steps; false when cancelled meanwhile. */
bool hub_sleep_cancellable(double s, const hub_conn_opts *c);

#endif
