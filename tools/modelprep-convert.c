/*
 * modelprep-convert - the convert job without the server: a PyTorch or
 * GGUF checkpoint (a model folder or one file) to a safetensors folder,
 * through the same conv_run the job calls. Used by bench/convert.sh.
 *
 *   modelprep-convert [--dtype keep|bf16|fp16|fp32] [--max-shard-bytes N]
 *                     SRC OUT_DIR
 *
 * Prints the result object as one JSON line; any error: exit 1 and
 * "code: message" on stderr.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/convert/convert.h"

static void on_log(void *cb, const char *level, const char *msg) {
    (void)cb;
    if (strcmp(level, "debug") != 0) fprintf(stderr, "%s: %s\n", level, msg);
}

int main(int argc, char **argv) {
    conv_opts o = {.log = on_log};
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
            if (!conv_parse_dtype(argv[++i], &o.dtype)) {
                fprintf(stderr, "bad --dtype %s\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--max-shard-bytes") == 0 && i + 1 < argc) {
            char *end = NULL;
            unsigned long long v = strtoull(argv[++i], &end, 10);
            if (!end || *end || v == 0) {
                fprintf(stderr, "bad --max-shard-bytes %s\n", argv[i]);
                return 2;
            }
            o.max_shard_bytes = v;
        } else {
            break;
        }
    }
    if (argc - i != 2) {
        fprintf(stderr, "usage: modelprep-convert [--dtype keep|bf16|fp16|fp32] "
                        "[--max-shard-bytes N] SRC OUT_DIR\n");
        return 2;
    }
    o.src = argv[i];
    o.out_dir = argv[i + 1];
    json_t *res = NULL;
    mp_error err = {0};
    if (conv_run(&o, &res, &err) != 0) {
        fprintf(stderr, "%s: %s\n", err.code, err.message);
        return 1;
    }
    char *s = json_dumps(res, JSON_COMPACT);
    if (s) puts(s);
    free(s);
    json_decref(res);
    return 0;
}
