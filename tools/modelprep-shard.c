/*
 * modelprep-shard - the shard job without the server: a model folder to a
 * tensor-parallel sharded state, through the same shard_run the job calls.
 * Used by bench/shard.sh.
 *
 *   modelprep-shard --tp N [--naming sglang|hf] [--max-part-bytes N]
 *                   [--overwrite] MODEL_DIR OUT_DIR
 *
 * Prints the result object as one JSON line; any error: exit 1 and
 * "code: message" on stderr.
 */
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/shard.h"

static void on_log(void *cb, const char *level, const char *msg) {
    (void)cb;
    if (strcmp(level, "debug") != 0) fprintf(stderr, "%s: %s\n", level, msg);
}

static int usage(void) {
    fprintf(stderr, "usage: modelprep-shard --tp N [--naming sglang|hf] [--max-part-bytes N] "
                    "[--overwrite] MODEL_DIR OUT_DIR\n");
    return 2;
}

int main(int argc, char **argv) {
    shard_opts o = {.log = on_log, .naming = TP_NAMING_SGLANG};
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--tp") == 0 && i + 1 < argc) {
            char *end = NULL;
            long v = strtol(argv[++i], &end, 10);
            if (!end || *end || v < 1 || v > 1024) return usage();
            o.tp = (int)v;
        } else if (strcmp(argv[i], "--naming") == 0 && i + 1 < argc) {
            i++;
            if (strcmp(argv[i], "hf") == 0)
                o.naming = TP_NAMING_HF;
            else if (strcmp(argv[i], "sglang") != 0)
                return usage();
        } else if (strcmp(argv[i], "--max-part-bytes") == 0 && i + 1 < argc) {
            char *end = NULL;
            unsigned long long v = strtoull(argv[++i], &end, 10);
            if (!end || *end || v == 0) return usage();
            o.max_part_bytes = v;
        } else if (strcmp(argv[i], "--overwrite") == 0) {
            o.overwrite = true;
        } else {
            return usage();
        }
    }
    if (argc - i != 2 || o.tp < 1) return usage();
    char *src = realpath(argv[i], NULL);
    if (!src) {
        fprintf(stderr, "not_found: %s\n", argv[i]);
        return 1;
    }
    o.model_dir = src;
    o.output_dir = argv[i + 1];
    o.source_model = argv[i];
    json_t *res = NULL;
    mp_error err = {0};
    int rc = shard_run(&o, &res, &err);
    free(src);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", err.code, err.message);
        return 1;
    }
    char *s = json_dumps(res, JSON_COMPACT);
    printf("%s\n", s ? s : "{}");
    free(s);
    json_decref(res);
    return 0;
}
