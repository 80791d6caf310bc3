/*
 * modelprep-shard - the shard job without the server: a model folder to a
 * tensor-parallel sharded state, through the same shard_run the job calls.
 * Used by bench/shard.sh.
 *
 *   modelprep-shard --tp N [--naming sglang|hf] [--max-part-bytes N]
 *                   [--overwrite] [--tag T] [--checkpoint-out F] [--resume F]
 *                   [--stop-after-parts N] MODEL_DIR OUT_DIR
 *
 * --tag names the temp folder (OUT_DIR.tmp-T); --checkpoint-out writes each
 * resume checkpoint to F; --resume F continues from one; --stop-after-parts
 * stops ("cancelled") after N checkpoints - together they let tests
 * exercise the job's resume path without killing a server.
 *
 * Prints the result object as one JSON line; any error: exit 1 and
 * "code: message" on stderr.
 */
#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/shard/shard.h"

typedef struct cli {
    const char *ckpt_out;
    long stop_after, saved;
} cli;

static void on_log(void *cb, const char *level, const char *msg) {
    (void)cb;
    if (strcmp(level, "debug") != 0) fprintf(stderr, "%s: %s\n", level, msg);
}

static void on_checkpoint(void *cb, json_t *state) {
    cli *c = cb;
    c->saved++;
    if (c->ckpt_out && json_dump_file(state, c->ckpt_out, JSON_COMPACT) != 0)
        fprintf(stderr, "warn: cannot write %s\n", c->ckpt_out);
    json_decref(state);
}

static bool on_cancelled(void *cb) {
    cli *c = cb;
    return c->stop_after > 0 && c->saved >= c->stop_after;
}

static int usage(void) {
    fprintf(stderr, "usage: modelprep-shard --tp N [--naming sglang|hf] [--max-part-bytes N] "
                    "[--overwrite] MODEL_DIR OUT_DIR\n");
    return 2;
}

int main(int argc, char **argv) {
    cli cl = {0};
    json_t *resume = NULL;
    shard_opts o = {.log = on_log,
                    .naming = TP_NAMING_SGLANG,
                    .cb = &cl,
                    .checkpoint = on_checkpoint,
                    .cancelled = on_cancelled,
                    .draining = on_cancelled};
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
        } else if (strcmp(argv[i], "--tag") == 0 && i + 1 < argc) {
            o.tmp_tag = argv[++i];
        } else if (strcmp(argv[i], "--checkpoint-out") == 0 && i + 1 < argc) {
            cl.ckpt_out = argv[++i];
        } else if (strcmp(argv[i], "--stop-after-parts") == 0 && i + 1 < argc) {
            cl.stop_after = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--resume") == 0 && i + 1 < argc) {
            json_error_t je;
            json_decref(resume);
            resume = json_load_file(argv[++i], 0, &je);
            if (!resume) {
                fprintf(stderr, "bad --resume file: %s\n", je.text);
                return 2;
            }
        } else {
            json_decref(resume);
            return usage();
        }
    }
    o.resume = resume;
    if (argc - i != 2 || o.tp < 1) {
        json_decref(resume);
        return usage();
    }
    char *src = realpath(argv[i], NULL);
    if (!src) {
        fprintf(stderr, "not_found: %s\n", argv[i]);
        json_decref(resume);
        return 1;
    }
    o.model_dir = src;
    o.output_dir = argv[i + 1];
    o.source_model = argv[i];
    json_t *res = NULL;
    mp_error err = {0};
    int rc = shard_run(&o, &res, &err);
    free(src);
    json_decref(resume);
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
