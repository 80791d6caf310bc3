/*
 * quantize.h - weight quantization (qz_ prefix): FP8 e4m3 (per tensor, per
 * output channel, DeepSeek-style blocks) and bitsandbytes' NF4 and LLM.int8
 * formats, bit for bit what the references produce:
 *
 *   fp8, fp8-channel, fp8-block: in float32, scale = amax / 448 over the
 *     group (1.0 when amax is 0), q = (x / scale) clamped to [-448, 448] and
 *     rounded to e4m3fn as torch's .to(torch.float8_e4m3fn) does (nearest,
 *     ties to even). The stored scale multiplies: W = fp8(q) * scale (also
 *     for fp8-block's `weight_scale_inv`, despite its name).
 *   nf4: bitsandbytes' quantize_4bit(quant_type="nf4") on CPU, blocksize 64,
 *     first element of a pair in the high nibble; with double quantization
 *     the absmax vector becomes quantize_blockwise(absmax - mean(absmax),
 *     blocksize=256) over bitsandbytes' dynamic map (its CPU kernel).
 *   int8: bitsandbytes' int8_vectorwise_quant of the weight cast to fp16, as
 *     Int8Params does: SCB[n] = max|W[n,:]|, q = round(W * (1/SCB * 127)).
 *
 * One source tensor (2-D, F32/F16/BF16, row-major [N, K]) becomes a fixed
 * set of output tensors ("parts") whose names, dtypes and shapes depend only
 * on the parameters and the source's name, dtype and shape: qz_plan_tensor
 * says what they are, so a writer can lay out safetensors headers before any
 * data is read, and qz_quantize fills them from the source bytes.
 *
 * Pure functions: no globals, no I/O; the functions are thread-safe and two
 * threads may quantize different tensors at the same time. The offline job
 * (qz_run) is in qz_run.c; warm_load's on-the-fly quantization calls
 * qz_plan_tensor/qz_quantize directly.
 */
#ifndef MP_LOADER_QUANTIZE_H
#define MP_LOADER_QUANTIZE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"
#include "util/tensor/tensor.h"

typedef enum qz_method {
    QZ_FP8 = 0,     /* per tensor: .weight F8_E4M3 + .weight_scale F32 [] */
    QZ_FP8_CHANNEL, /* per output row: .weight_scale F32 [N, 1] */
    QZ_FP8_BLOCK,   /* .weight_scale_inv F32 [ceil(N/bn), ceil(K/bk)] */
    QZ_NF4,         /* bitsandbytes 4-bit NF4, transformers' serialization */
    QZ_INT8,        /* LLM.int8: .weight I8 [N, K] + .SCB F32 [N] + .weight_format */
    QZ_METHOD_COUNT
} qz_method;

#define QZ_FP8_MAX 448.0f
#define QZ_NF4_BLOCKSIZE 64     /* bitsandbytes' default, the only one we write */
#define QZ_NESTED_BLOCKSIZE 256 /* double quantization of the absmax vector */
#define QZ_MAX_PARTS 6
#define QZ_NAME_MAX 512

typedef struct qz_params {
    qz_method method;
    uint32_t block_n, block_k; /* fp8-block (default 128, 128) */
    bool double_quant;         /* nf4 (default true) */
    /* Threads one qz_quantize call may use, the caller's included (default
     * 1). The bytes are the same for any count. */
    int threads;
    /* NF4 double quant: the torch thread count whose absmax.mean() the
     * nested offset reproduces (see qz_mean_f32; default 1). */
    int torch_threads;
} qz_params;

/* One output tensor of a quantized source tensor. */
typedef struct qz_part {
    char name[QZ_NAME_MAX]; /* full tensor name */
    mp_dtype dtype;
    int ndim; /* 0 (scalar), 1 or 2 */
    uint64_t shape[2];
    uint64_t nbytes;
} qz_part;

typedef struct qz_plan {
    uint64_t rows, cols; /* the source's shape */
    int n;
    qz_part parts[QZ_MAX_PARTS]; /* parts[0] is always the quantized weight */
} qz_plan;

/* "fp8", "fp8-channel", "fp8-block", "nf4", "int8" <-> the enum; parse
 * returns -1 for an unknown name. */
int qz_method_parse(const char *s, qz_method *out);
const char *qz_method_name(qz_method m);
/* The defaults above for one method. */
void qz_params_default(qz_params *p, qz_method m);
/* torch's default intra-op thread count on this machine, as bitsandbytes'
 * callers get it: OMP_NUM_THREADS, else MKL_NUM_THREADS, else the number of
 * physical cores (what torch's cpuinfo counts). */
int qz_torch_default_threads(void);
/* Refuses block sizes of 0 or over 65536 ("bad_params"). */
int qz_params_check(const qz_params *p, mp_error *err);

/* ---- what a quantizer takes (qz_select.c) ---- */

typedef enum qz_selection {
    QZ_SEL_NOT_CANDIDATE = 0, /* not a 2-D F32/F16/BF16 "<module>.weight" */
    QZ_SEL_IGNORED,           /* a candidate whose module an ignore pattern matches */
    QZ_SEL_QUANTIZE,
} qz_selection;

/* What becomes of tensor `name` (dtype dt, ndim dimensions): the module
 * (the name without ".weight") is matched against ignore[0..nignore)
 * (fnmatch, `*` crossing dots) and, when `defaults`, the default ignore
 * patterns (embeddings, lm_head, norms, MoE routers/gates). *user_match
 * (may be NULL) gets the index of the user pattern that matched, or -1. */
qz_selection qz_select(const char *name, mp_dtype dt, int ndim, const char *const *ignore,
                       size_t nignore, bool defaults, int *user_match);

/* Refuses ("already_quantized") a source that is quantized already: a
 * quantization_config or compression_config in cfg or its text_config (cfg
 * may be NULL), tensors inspect recognizes as quantized (scales beside the
 * weights), or tensors in a quantized dtype (F8, I8, F4). `instead` ends
 * the message: what the user should do. */
int qz_check_source(const json_t *cfg, const mp_tensor *ts, size_t n, const char *instead,
                    mp_error *err);

/* The parts that `name` (a `<module>.weight`, 2-D, F32/F16/BF16, shape
 * [rows, cols], both > 0) becomes. Errors: "bad_params" (not 2-D, a dtype
 * that is not floating, an empty or too large tensor, a name too long). */
int qz_plan_tensor(const qz_params *p, const char *name, mp_dtype src_dtype,
                   const uint64_t shape[2], qz_plan *plan, mp_error *err);

/* Quantizes the row-major source bytes (src_dtype, the plan's shape) into
 * out[i], one buffer of plan->parts[i].nbytes per part. Errors:
 * "non_finite_weight" (a NaN or an Inf, named with the tensor and the first
 * offending index; nothing is defined about out then), "out_of_memory". */
int qz_quantize(const qz_params *p, const qz_plan *plan, mp_dtype src_dtype, const void *src,
                void *const out[], mp_error *err);

/* The config.json `quantization_config` for these parameters; `ignored` is
 * the list of module names left unquantized (NULL: none), compute_dtype the
 * model's torch dtype name ("bfloat16"; NULL: not written) for
 * bnb_4bit_compute_dtype. New reference. */
json_t *qz_quant_config(const qz_params *p, json_t *ignored, const char *compute_dtype);

/* ---- which tensors are quantized (qz_names.c) ---- */

/* A candidate: a 2-D F32/F16/BF16 tensor whose name ends in ".weight". */
bool qz_candidate(const char *name, mp_dtype dt, int ndim);
/* The default ignore patterns, NULL-terminated: embeddings, lm_head, norms,
 * MoE routers/gates (not gate_proj). Matched like user patterns. */
const char *const *qz_default_ignore(void);
/* Index of the first of pats[0..n) that matches `module` (fnmatch, `*`
 * crossing dots; a module is the tensor name without ".weight"), or -1. */
int qz_ignore_match(const char *module, const char *const *pats, size_t n);

/* ---- the offline job body (qz_run.c) ---- */

#define QZ_MAX_IGNORE 256

typedef struct qz_opts {
    const char *src;     /* a model folder of safetensors shards */
    const char *out_dir; /* final output folder (its parent must exist) */
    qz_params params;
    const char *const *ignore; /* user patterns (added to the defaults) */
    size_t nignore;
    bool no_default_ignore;   /* true: only the user's patterns */
    uint64_t max_shard_bytes; /* 0: CONV_DEFAULT_MAX_SHARD */
    const char *tag;          /* names the temp folder (job id), may be NULL */
    void *cb;                 /* reporting, as conv_opts; each may be NULL */
    void (*progress)(void *cb, uint64_t done, uint64_t total, const char *msg);
    bool (*cancelled)(void *cb);
    void (*log)(void *cb, const char *level, const char *msg);
} qz_opts;

/* Quantizes a checkpoint into a complete one: safetensors shards (split as
 * convert splits) with the quantized weights and their scales, the other
 * tensors as they were, config.json with quantization_config, the other
 * files copied. Streams tensor by tensor: peak memory is about the largest
 * tensor (source and parts), not the model. Built in a temp folder next to
 * out_dir, every shard fsynced and re-read (names, dtypes, shapes), then
 * renamed into place; a failure leaves nothing. *result = {"output_path",
 * "method", "files", "quantized", "copied", "ignored" (modules),
 * "unmatched_ignore" (user patterns that matched nothing), "warnings",
 * "bytes_in", "bytes_out", "seconds", ...}. Errors: "unsupported_format"
 * (not safetensors: convert first), "already_quantized", "non_finite_weight",
 * "nothing_to_quantize", "cancelled", "output_exists", "io_error". */
int qz_run(const qz_opts *o, json_t **result, mp_error *err);

/* ---- kernels, exposed for unit tests and warm_load ---- */

/* f32 -> e4m3fn, round to nearest even; |x| must be <= 448 or NaN. */
uint8_t qz_f32_to_e4m3(float x);
/* The 16 NF4 and the 256 dynamic-map codes, as bitsandbytes builds them. */
const float *qz_nf4_code(void);
const float *qz_dynamic_code(void);
/* bitsandbytes' CPU quantize_blockwise over the dynamic map: out[n] codes,
 * absmax[ceil(n/blocksize)]. A zero block gives codes 0 and absmax 0. */
int qz_quantize_blockwise(const float *a, size_t n, size_t blocksize, uint8_t *out, float *absmax,
                          mp_error *err);
/* The nested offset: torch's absmax.mean() on CPU, reproduced: its cascade
 * sum (SumKernel.cpp) with its vector width on this CPU, split as its
 * two-pass reduction splits it between `torch_threads` threads when there
 * are 32768 elements or more (below that, or with 1 thread, one pass), then
 * divided by n. torch's result depends on its thread count; bitsandbytes'
 * therefore does too. */
float qz_mean_f32_threads(const float *a, size_t n, int torch_threads);
/* Single-thread torch (torch.set_num_threads(1)). */
float qz_mean_f32(const float *a, size_t n);

#endif
