/*
 * modelprep-tensors - list the tensors of weight files (any format
 * weights_open reads, a sharded index, or a model directory) with dtype,
 * shape, byte size and the sha256 of each tensor's materialized bytes
 * (contiguous, row-major, little-endian; views gathered). The digests are
 * what the Python cross-checks compare against the producers' bytes.
 *
 *   modelprep-tensors [--json] FILE...
 *
 * Text: one tab-separated line per tensor (name, dtype, shape, bytes,
 * sha256), a "# FILE" line before each file. --json: one object per line,
 * {"file","name","dtype","shape","bytes","sha256"}. Any error: exit 1 and
 * one line on stderr.
 */
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/gguf/gguf.h"
#include "loader/formats/weights.h"

static const char *dtype_name(const mp_tensor *t) {
    if (t->dtype != MP_DT_GGML) return mp_dtype_name(t->dtype);
    const char *s = gguf_type_name(t->ggml_type);
    return s ? s : "GGML";
}

static int sha256_hex(const void *p, size_t n, char out[65]) {
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    int ok = c && EVP_DigestInit_ex(c, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(c, p, n) == 1 &&
             EVP_DigestFinal_ex(c, md, &mdlen) == 1 && mdlen == 32;
    EVP_MD_CTX_free(c);
    if (!ok) return -1;
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    return 0;
}

static int list_file(const char *path, bool as_json, bool header) {
    mp_weights *w = NULL;
    mp_error err = {0};
    if (weights_open(path, &w, &err) != 0) {
        fprintf(stderr, "modelprep-tensors: %s: %s: %s\n", path, err.code, err.message);
        return -1;
    }
    if (header && !as_json) printf("# %s\n", path);
    unsigned char *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    for (size_t i = 0; i < w->ntensors && rc == 0; i++) {
        const mp_tensor *t = &w->tensors[i];
        if (t->nbytes > SIZE_MAX) {
            fprintf(stderr, "modelprep-tensors: %s: tensor '%s' too large\n", path, t->name);
            rc = -1;
            break;
        }
        if (t->nbytes > cap) {
            unsigned char *nb = realloc(buf, (size_t)t->nbytes);
            if (!nb) {
                fprintf(stderr, "modelprep-tensors: %s: out of memory for '%s' (%llu bytes)\n",
                        path, t->name, (unsigned long long)t->nbytes);
                rc = -1;
                break;
            }
            buf = nb;
            cap = (size_t)t->nbytes;
        }
        char hex[65];
        if (weights_read(w, t, buf, &err) != 0) {
            fprintf(stderr, "modelprep-tensors: %s: %s: %s\n", path, err.code, err.message);
            rc = -1;
            break;
        }
        if (sha256_hex(buf, (size_t)t->nbytes, hex) != 0) {
            fprintf(stderr, "modelprep-tensors: sha256 failed\n");
            rc = -1;
            break;
        }
        if (as_json) {
            json_t *shape = json_array();
            for (int d = 0; d < t->ndim; d++)
                json_array_append_new(shape, json_integer(t->shape[d]));
            json_t *o = json_pack("{s:s, s:s?, s:s, s:o, s:I, s:s}", "file", path, "name", t->name,
                                  "dtype", dtype_name(t), "shape", shape, "bytes",
                                  (json_int_t)t->nbytes, "sha256", hex);
            char *s = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
            json_decref(o);
            if (!s) {
                fprintf(stderr, "modelprep-tensors: %s: tensor %zu: name is not UTF-8\n", path, i);
                rc = -1;
                break;
            }
            printf("%s\n", s);
            free(s);
        } else {
            printf("%s\t%s\t[", t->name, dtype_name(t));
            for (int d = 0; d < t->ndim; d++)
                printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
            printf("]\t%llu\t%s\n", (unsigned long long)t->nbytes, hex);
        }
    }
    free(buf);
    weights_close(w);
    return rc;
}

int main(int argc, char **argv) {
    bool as_json = false;
    int first = 1;
    for (; first < argc && argv[first][0] == '-' && argv[first][1]; first++) {
        if (strcmp(argv[first], "--json") == 0)
            as_json = true;
        else if (strcmp(argv[first], "--") == 0) {
            first++;
            break;
        } else {
            fprintf(stderr, "modelprep-tensors: unknown option %s\n", argv[first]);
            return 2;
        }
    }
    if (first >= argc) {
        fprintf(stderr, "usage: modelprep-tensors [--json] FILE...\n");
        return 2;
    }
    for (int i = first; i < argc; i++) {
        if (list_file(argv[i], as_json, argc - first > 1) != 0) return 1;
        if (fflush(stdout) != 0) {
            fprintf(stderr, "modelprep-tensors: writing output failed\n");
            return 1;
        }
    }
    return 0;
}
