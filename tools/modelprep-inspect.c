/*
 * modelprep-inspect - the inspect job without the server: what a model
 * folder's checkpoint is, from its headers only, through the same insp_run
 * the job calls. Used by bench/convert.sh.
 *
 *   modelprep-inspect [--tp 1,2,4,8] [--kv-scales FILE] MODEL_DIR
 *
 * Prints the result object as one JSON line; any error: exit 1 and
 * "code: message" on stderr.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/inspect/inspect.h"

int main(int argc, char **argv) {
    insp_opts o = {0};
    int64_t tps[64];
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--tp") == 0 && i + 1 < argc) {
            char *p = argv[++i];
            o.ntp = 0;
            while (*p && o.ntp < 64) {
                char *end = NULL;
                long v = strtol(p, &end, 10);
                if (end == p || v < 1 || v > 1024) {
                    fprintf(stderr, "bad --tp %s\n", argv[i]);
                    return 2;
                }
                tps[o.ntp++] = v;
                p = *end == ',' ? end + 1 : end;
                if (*end && *end != ',') {
                    fprintf(stderr, "bad --tp %s\n", argv[i]);
                    return 2;
                }
            }
            o.tp_sizes = tps;
        } else if (strcmp(argv[i], "--kv-scales") == 0 && i + 1 < argc) {
            o.kv_scales_path = argv[++i];
        } else {
            break;
        }
    }
    if (argc - i != 1) {
        fprintf(stderr, "usage: modelprep-inspect [--tp 1,2,4,8] [--kv-scales FILE] MODEL_DIR\n");
        return 2;
    }
    o.model_dir = argv[i];
    json_t *res = NULL;
    mp_error err = {0};
    if (insp_run(&o, &res, &err) != 0) {
        fprintf(stderr, "%s: %s\n", err.code, err.message);
        return 1;
    }
    char *s = json_dumps(res, JSON_COMPACT);
    if (s) puts(s);
    free(s);
    json_decref(res);
    return 0;
}
