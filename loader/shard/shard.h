/*
 * shard.h - write a tensor-parallel sharded state from a checkpoint's files
 * (shard_ prefix), free of HTTP and tasks: the shard job (job_shard.c) and
 * the modelprep-shard tool both drive it.
 *
 * Output (SGLang's ShardedStateLoader layout): model-rank-{r}-part-{p}
 * .safetensors for every rank, parts of at most max_part_bytes of tensor data
 * (a larger tensor gets a part of its own), the model's config/tokenizer/
 * generation-config files, and sharded_state.json (the manifest). Everything
 * is written under "<output>.tmp-<tag>" and renamed into place at the end.
 *
 * Streaming: the targets of a part are written in the safetensors writer's
 * file order, which is the same for every rank (every rank holds the same
 * shapes); each source tensor is read once, in chunks, and each chunk's
 * slices go to every rank's open writer. Source files are mapped and each
 * chunk dropped from the mapping once written (MADV_DONTNEED), so peak
 * memory is about one gather buffer (SHARD_CHUNK) per worker plus a chunk of
 * mapped source per worker plus the tensor tables, independent of the model
 * size (~45 MiB RSS for a 2 GB model at tp=4 on 2 CPUs); only a strided
 * PyTorch view (a .bin input) is materialized whole first.
 *
 * Parallel: the ranks of a piece are independent files, so a small worker
 * pool (one thread per CPU, at most 9) streams them side by side; fsyncs
 * and checks run on the pool too. Writeback is started early
 * (sync_file_range) so the final fsyncs are short.
 *
 * Checked: each written file is reopened with st_open, its tensor table
 * compared with what was meant, and the CRC-32C of its data section compared
 * with the one computed while writing.
 */
#ifndef MP_LOADER_SHARD_H
#define MP_LOADER_SHARD_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "loader/tp_rules/tp_rules.h"
#include "util/error.h"

#define SHARD_CHUNK (16u << 20)
#define SHARD_DEFAULT_PART_BYTES (5ull << 30) /* SGLang's --max-file-size default */
#define SHARD_MANIFEST "sharded_state.json"
#define SHARD_PATTERN "model-rank-{rank}-part-{part}.safetensors"

typedef struct shard_opts {
    const char *model_dir;  /* realpath of the source model */
    const char *output_dir; /* final folder (must not exist unless overwrite) */
    int tp;
    uint64_t max_part_bytes; /* 0: SHARD_DEFAULT_PART_BYTES */
    tp_naming naming;
    bool overwrite;
    const char *source_model; /* manifest: as submitted (repo id or path) */
    const char *source_revision;
    /* Resume: the temp folder is "<output_dir>.tmp-<tmp_tag>" (tag: the job
     * id; NULL: the pid). After each part is written and checked for every
     * rank, checkpoint() gets the state (owned by the callee); a later run
     * given that state as `resume` (borrowed) with the same tag, split and
     * source re-checks the finished files and writes only the rest. */
    const char *tmp_tag;
    const json_t *resume;
    void (*checkpoint)(void *cb, json_t *state);
    /* Callbacks, all optional. progress: source bytes done of total.
     * cancelled: non-zero stops with "cancelled". */
    void *cb;
    void (*progress)(void *cb, uint64_t done, uint64_t total, const char *msg);
    bool (*cancelled)(void *cb);
    /* true: the stop is a drain (the job will be resumed), so the temp
     * folder is kept for the next run; otherwise a failed run removes it. */
    bool (*draining)(void *cb);
    void (*log)(void *cb, const char *level, const char *msg);
} shard_opts;

/* Runs the whole thing. *result (owned by the caller) on success:
 * {output_path, manifest, tp_size, naming, parts, ranks: [{rank, files:
 * [{name, bytes, crc32c}], bytes}], rank_bytes, parts, bytes_read,
 * bytes_written, files_resumed, seconds}.
 * Errors: those of tp_rules.h ("bad_tp_size", "unsupported_architecture",
 * "unsplittable", "incomplete", "unsupported_quantization"), "not_found" (no
 * weights), "output_exists", "verify_failed", "io_error", "cancelled". */
int shard_run(const shard_opts *o, json_t **result, mp_error *err);

#endif
