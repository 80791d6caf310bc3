/*
 * convert.h - PyTorch (.bin/.pt, single or sharded) and GGUF checkpoints to
 * safetensors (conv_ prefix). The conversion streams tensor by tensor: a
 * contiguous tensor goes through a bounded buffer, only a strided view or a
 * dequantized GGUF tensor is materialized whole, so peak memory is about the
 * largest such tensor, never the model.
 *
 * Output: a directory with model.safetensors (everything fits in one shard,
 * as transformers names it, no index) or model-0000N-of-0000M.safetensors plus
 * model.safetensors.index.json; every shard has __metadata__ {"format":"pt"}.
 * It is built in a temp directory next to the target, every tensor is read
 * back from the re-opened shards and compared with the source, and only then
 * is the directory renamed into place. A failure or a cancel leaves nothing.
 *
 * The job (job_convert.c) and the CLI (tools/modelprep-convert.c) both call
 * conv_run; the small pure helpers are exposed for unit tests.
 */
#ifndef MP_LOADER_CONVERT_H
#define MP_LOADER_CONVERT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"
#include "util/error.h"

#define CONV_DEFAULT_MAX_SHARD 5000000000ull /* huggingface_hub's default */
/* Marks a directory as ours, so a later convert may replace it. */
#define CONV_MARKER ".modelprep-convert.json"

typedef struct conv_opts {
    const char *src;     /* model directory or one weight file */
    const char *out_dir; /* final output directory (its parent must exist) */
    /* Output dtype: MP_DT_INVALID keeps each tensor's own (for GGUF: block
     * types become F16, plain types are kept); else F32, F16 or BF16. */
    mp_dtype dtype;
    uint64_t max_shard_bytes; /* 0: CONV_DEFAULT_MAX_SHARD */
    const char *tag;          /* names the temp dir (job id), may be NULL */
    /* Reporting; each may be NULL. cancelled() is polled between tensors and
     * between chunks of a large tensor. */
    void *cb;
    void (*progress)(void *cb, uint64_t done, uint64_t total, const char *msg);
    bool (*cancelled)(void *cb);
    void (*log)(void *cb, const char *level, const char *msg);
} conv_opts;

/* Converts. On success *result = {"output_path","files":[{name,size}],
 * "tensors","bytes","shared_tensors_deduplicated","deduplicated":[{name,
 * same_as}],"source_format","dtype","verified":true,"seconds"}.
 * Errors carry the reader's codes ("unsafe_pickle", "bad_header", ...) and
 * "cancelled", "output_exists", "io_error", "unsupported_format". */
int conv_run(const conv_opts *o, json_t **result, mp_error *err);

/* ---- pure helpers (convert_plan.c) ---- */

/* The weight file(s) of a model directory to convert: the pytorch index when
 * present, else the *.bin / *.pt / *.pth files (training/optimizer state
 * excluded), else the one *.gguf. *paths is a malloc'd array of n malloc'd
 * paths. Errors: "not_found" (nothing convertible; says so when the model is
 * already safetensors), "ambiguous" (several GGUF files). */
int conv_find_sources(const char *dir, char ***paths, size_t *n, mp_error *err);
void conv_free_paths(char **paths, size_t n);

/* True for a file name that is a weight or training-state file (never copied
 * along as an auxiliary file). */
bool conv_is_weight_file(const char *name);

/* huggingface_hub's split: in order, a tensor larger than max gets a shard
 * of its own, else a new shard starts when adding it would pass max.
 * shard_of[i] gets the 0-based shard of tensor i; returns the shard count. */
size_t conv_plan_shards(const uint64_t *bytes, size_t n, uint64_t max, uint32_t *shard_of);
/* "model.safetensors" when nshards == 1, else model-%05u-of-%05u.safetensors. */
void conv_shard_name(size_t index, size_t nshards, char *out, size_t outsz);

/* Cast n elements between F16 / BF16 / F32 / F64 (src) and F16 / BF16 / F32
 * (dst), rounding to nearest even, NaN and Inf kept. false for other pairs. */
bool conv_cast(mp_dtype from, mp_dtype to, const void *src, void *dst, size_t n);
/* Whether convert casts tensors of dtype dt when asked for another dtype. */
bool conv_castable(mp_dtype dt);

/* "fp16" -> MP_DT_F16, "bf16", "fp32"; "keep" and NULL -> MP_DT_INVALID with
 * true; false for anything else. */
bool conv_parse_dtype(const char *s, mp_dtype *out);

/* torch's name of a float dtype ("bfloat16", "float16", "float32",
 * "float64"), NULL for the others. */
const char *conv_torch_dtype(mp_dtype dt);
/* The torch name of the float dtype holding the most bytes among n tensors
 * (dts[i], bytes[i]); NULL when none is F16/BF16/F32/F64. */
const char *conv_dominant_torch_dtype(const mp_dtype *dts, const uint64_t *bytes, size_t n);
/* Sets "torch_dtype" and "dtype" of a config.json object (and of its
 * "text_config" object when present) to torch_dtype. Returns whether any
 * value changed; false when cfg is not an object. */
bool conv_config_set_dtype(json_t *cfg, const char *torch_dtype);

/* The default output folder name for a model: "org--name-<revision>" for a
 * hub repo (a '/' in the revision becomes '_'), else the last path part of
 * the local directory. Writes at most outsz bytes; false when unusable. */
bool conv_default_name(const char *model, const char *revision, bool is_hub, char *out,
                       size_t outsz);

/* Confines an output folder: absolute, no NUL / "." / ".." parts, not an
 * existing non-directory; the realpath of its deepest existing ancestor plus
 * the rest must lie strictly inside one of roots[] (NULL-terminated) and not
 * inside `forbid` (the hub cache, may be NULL), and must not be the model
 * directory or one of its ancestors. *out = the resolved path (caller frees).
 * Error "bad_output". */
int conv_confine_output(const char *path, const char *const *roots, const char *forbid,
                        const char *model_dir, char **out, mp_error *err);

/* ---- the output folder (convert.c; quantize writes its output the same way) ---- */

/* Creates "<parent>/.<name>.<what>-<tag>" next to `out` (tag NULL: the pid),
 * removing a leftover of a crashed run first. *tmp is malloc'd. */
int conv_make_tmp_dir(const char *out, const char *tag, const char *what, char **tmp,
                      mp_error *err);
/* Renames tmp_dir to out and fsyncs the parent. An existing empty folder or
 * one holding CONV_MARKER (made by modelprep) is replaced; anything else is
 * "output_exists". *old_left: the replaced folder could not be removed. */
int conv_publish(const char *tmp_dir, const char *out, bool *old_left, mp_error *err);
/* Copies the regular, non-weight, non-hidden files of src_dir into tmp_dir,
 * fsynced, config.json left out when skip_config; buf is scratch space. */
int conv_copy_aux(const char *src_dir, const char *tmp_dir, bool skip_config, char *buf,
                  size_t bufsz, mp_error *err);
/* A JSON file written to "<path>.tmp", fsynced and renamed (indent 2, sorted
 * keys, trailing newline). */
int conv_write_json(const char *path, json_t *doc, mp_error *err);
/* fsync of a file or folder by path; removal of a flat folder we made. */
int conv_sync_path(const char *path, mp_error *err);
int conv_rm_flat_dir(const char *dir);

#endif
