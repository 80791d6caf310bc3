/*
 * inspect.h - what a checkpoint is, from its headers only (insp_ prefix):
 * architecture, formats, parameter and byte counts by dtype, the
 * quantization method and its settings (from config.json, the method's own
 * config file, or recognized from tensor names and dtypes), KV-cache scales,
 * and the bytes the largest rank holds for each tensor-parallel size.
 *
 * Never reads tensor data of safetensors or GGUF files (a 100 GB checkpoint
 * inspects in milliseconds); a .bin is unpickled, its storages are not read.
 * Layouts and config fields: /work/shared/reference/weight-formats.md §5.
 */
#ifndef MP_LOADER_INSPECT_H
#define MP_LOADER_INSPECT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/tensor/tensor.h"
#include "util/error.h"

typedef struct insp_opts {
    const char *model_dir;
    const int64_t *tp_sizes; /* NULL: 1, 2, 4, 8 */
    size_t ntp;
    const char *kv_scales_path; /* already confined, or NULL */
} insp_opts;

/* Result: {"architecture","model_type","formats","files","params_total",
 * "bytes_total","tensors","tensors_by_dtype":{dt:{tensors,params,bytes}},
 * "quantization":{...},"per_tp":[{tp,bytes_per_rank,...}],"warnings":[...],
 * "seconds"}. Errors: "not_found" (no config.json / no weights),
 * "bad_config", and the readers' codes. */
int insp_run(const insp_opts *o, json_t **result, mp_error *err);

/* ---- quantization (inspect_quant.c) ---- */

/* The quantization object for a declared config (config.json's
 * quantization_config / compression_config, or one of the method files as
 * parsed JSON); `file` names where it came from ("config.json",
 * "quantize_config.json", "quant_config.json", "hf_quant_config.json").
 * Unknown methods are reported as declared with a warning appended. */
json_t *insp_quant_from_config(const json_t *qc, const char *file, json_t *warnings);

/* Recognizes a quantized checkpoint from tensor names and dtypes alone
 * (§5.5). Returns the quantization object with source "tensors", or NULL
 * when nothing looks quantized. ts need not be sorted. */
json_t *insp_quant_from_tensors(const mp_tensor *ts, size_t n);

/* Facts from the tensors that refine a declared method: bnb pre-quantized,
 * KV-cache scale tensors present. Adds fields to q (borrowed). */
void insp_quant_refine(json_t *q, const mp_tensor *ts, size_t n, json_t *warnings);

/* Checks a KV-cache scales JSON document as SGLang's QuantParamSchema /
 * KVCacheQuantSchema do: "model_type" key present and (when not null) equal
 * to model_type; kv_cache.dtype "float8_e4m3fn"; scaling_factor ranks
 * 0..R-1 all present, each with exactly num_layers entries for layers
 * 0..num_layers-1, every value a number. Returns true when valid (*tp_size
 * = R), else false with reason filled. num_layers < 0: not known. */
bool insp_kv_scales_check(const json_t *doc, const char *model_type, int64_t num_layers,
                          int64_t *tp_size, char *reason, size_t rsz);

#endif
