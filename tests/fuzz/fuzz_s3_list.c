/*
 * fuzz_s3_list.c - libFuzzer target: the input is one ListObjectsV2 answer
 * as an S3-compatible store (or anything pretending to be one) might send
 * it; s3_parse_list_page must accept it or fail with an error, never read
 * out of bounds, and leave nothing allocated after s3_listing_free.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loader/remote/remote_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    s3_listing l = {0};
    char token[2048];
    bool truncated = false;
    mp_error err;
    /* a copy without a terminator, so reading past the end is caught */
    char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    if (s3_parse_list_page(buf, size, &l, token, sizeof token, &truncated, &err) == 0) {
        for (size_t i = 0; i < l.n; i++)
            if (!l.objs[i].key || strlen(l.objs[i].etag) >= sizeof l.objs[i].etag) abort();
        if (truncated && strlen(token) >= sizeof token) abort();
    }
    s3_listing_free(&l);
    free(buf);
    return 0;
}
