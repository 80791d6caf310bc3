/*
 * pt_dump.c - test helper: opens a weight file through weights_open and
 * prints every tensor's descriptor and the sha256 of its materialized
 * (contiguous) bytes as JSON, so pytest can compare against torch. Exits 1
 * with {"error": {"code", "message"}} on stderr when the open fails.
 */
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>

#include "loader/formats/weights.h"

static int sha256_hex(const void *p, size_t n, char out[65]) {
    unsigned char md[32];
    unsigned len = 0;
    if (!EVP_Digest(p, n, md, &len, EVP_sha256(), NULL)) return -1;
    for (unsigned i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: pt_dump FILE\n");
        return 2;
    }
    mp_error err = {0};
    mp_weights *w = NULL;
    if (weights_open(argv[1], &w, &err) != 0) {
        json_t *e = json_pack("{s:{s:s,s:s}}", "error", "code", err.code, "message", err.message);
        char *s = e ? json_dumps(e, JSON_COMPACT) : NULL;
        fprintf(stderr, "%s\n", s ? s : err.message);
        free(s);
        json_decref(e);
        return 1;
    }
    json_t *arr = json_array();
    int rc = 0;
    for (size_t i = 0; i < w->ntensors && rc == 0; i++) {
        const mp_tensor *t = &w->tensors[i];
        void *buf = malloc(t->nbytes ? t->nbytes : 1);
        char hex[65];
        if (!buf || weights_read(w, t, buf, &err) != 0 || sha256_hex(buf, t->nbytes, hex)) {
            fprintf(stderr, "read %s: %s: %s\n", t->name, err.code, err.message);
            free(buf);
            rc = 1;
            break;
        }
        free(buf);
        json_t *shape = json_array(), *strides = json_array();
        for (int d = 0; d < t->ndim; d++) {
            json_array_append_new(shape, json_integer(t->shape[d]));
            json_array_append_new(strides, json_integer(t->strides[d]));
        }
        json_array_append_new(arr, json_pack("{s:s,s:s,s:o,s:o,s:I,s:b,s:I,s:I,s:s}", "name",
                                             t->name, "dtype", mp_dtype_name(t->dtype), "shape",
                                             shape, "strides", strides, "storage_offset",
                                             (json_int_t)t->storage_offset, "is_view", t->is_view,
                                             "storage_id", (json_int_t)t->storage_id, "nbytes",
                                             (json_int_t)t->nbytes, "sha256", hex));
    }
    if (rc == 0) {
        json_t *doc = json_pack("{s:i,s:o}", "format", (int)w->format, "tensors", arr);
        char *s = json_dumps(doc, JSON_INDENT(1));
        puts(s);
        free(s);
        json_decref(doc);
    } else {
        json_decref(arr);
    }
    weights_close(w);
    return rc;
}
