/*
 * gguf.h - GGUF v2/v3 (llama.cpp / ggml) weight files: the reader
 * (gguf_open), the ggml type table, dequantization
 * of block-quantized rows, and the GGUF -> Hugging Face name / config map
 * for llama-family models.
 *
 * gguf_open fills an mp_weights: one file, one mp_tensor per tensor info
 * (shape outermost-first, i.e. ggml's ne[] reversed; dtype MP_DT_GGML plus
 * ggml_type for block-quantized types; data_bytes == nbytes == the raw
 * block bytes), and w->metadata = {key: value} with every KV of the file.
 * Value mapping: integers -> JSON integers (UINT64 above INT64_MAX -> real),
 * FLOAT32 -> the shortest decimal that reads back as the same float,
 * FLOAT64 -> real, NaN/Inf -> null, BOOL -> true/false, STRING -> string
 * (invalid UTF-8 replaced by U+FFFD), ARRAY -> array. An array too big for
 * the JSON budget becomes {"omitted": true, "type": "[UINT8]", "count": N}.
 * The GGUF type of each key is kept: gguf_meta_type().
 */
#ifndef MP_LOADER_GGUF_H
#define MP_LOADER_GGUF_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"
#include "util/error.h"

/* ggml_type ids (ggml d99724f2). */
enum {
    GGUF_T_F32 = 0,
    GGUF_T_F16 = 1,
    GGUF_T_Q4_0 = 2,
    GGUF_T_Q4_1 = 3,
    GGUF_T_Q5_0 = 6,
    GGUF_T_Q5_1 = 7,
    GGUF_T_Q8_0 = 8,
    GGUF_T_Q8_1 = 9,
    GGUF_T_Q2_K = 10,
    GGUF_T_Q3_K = 11,
    GGUF_T_Q4_K = 12,
    GGUF_T_Q5_K = 13,
    GGUF_T_Q6_K = 14,
    GGUF_T_Q8_K = 15,
    GGUF_T_IQ4_NL = 20,
    GGUF_T_IQ4_XS = 23,
    GGUF_T_I8 = 24,
    GGUF_T_I16 = 25,
    GGUF_T_I32 = 26,
    GGUF_T_I64 = 27,
    GGUF_T_F64 = 28,
    GGUF_T_BF16 = 30,
    GGUF_T_TQ1_0 = 34,
    GGUF_T_TQ2_0 = 35,
    GGUF_T_MXFP4 = 39,
    GGUF_T_NVFP4 = 40,
    GGUF_T_COUNT = 43,
};

/* Metadata value type ids. */
enum {
    GGUF_V_UINT8 = 0,
    GGUF_V_INT8,
    GGUF_V_UINT16,
    GGUF_V_INT16,
    GGUF_V_UINT32,
    GGUF_V_INT32,
    GGUF_V_FLOAT32,
    GGUF_V_BOOL,
    GGUF_V_STRING,
    GGUF_V_ARRAY,
    GGUF_V_UINT64,
    GGUF_V_INT64,
    GGUF_V_FLOAT64,
    GGUF_V_COUNT
};

#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_NAME 63 /* ggml: GGML_MAX_NAME 64 incl. NUL */
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_STRING (1u << 30) /* ggml: GGUF_MAX_STRING_LENGTH */
#define GGUF_MAX_ARRAY (1u << 30)  /* ggml: GGUF_MAX_ARRAY_ELEMENTS */
#define GGUF_MAX_TENSORS (1u << 18)
#define GGUF_MAX_KV (1u << 16)
#define GGUF_MAX_ARRAY_DEPTH 4
/* JSON budget for metadata (jansson costs ~50 bytes a value): arrays past it
 * are summarized instead of materialized. Real tokenizers use < 1M. */
#define GGUF_JSON_MAX_ARRAY (1u << 22)
#define GGUF_JSON_MAX_VALUES (1u << 23)
#define GGUF_JSON_MAX_STRING_BYTES (256u << 20)

/* "Q4_K", "F16", ...; NULL for an id that is not a usable type (removed
 * ids 4, 5, 31-33, 36-38, out of range). */
const char *gguf_type_name(int ggml_type);
int gguf_type_from_name(const char *name); /* -1 when unknown */
/* Elements per block and bytes per block; 0 for unusable ids. */
unsigned gguf_type_block_size(int ggml_type);
unsigned gguf_type_block_bytes(int ggml_type);
bool gguf_type_is_quantized(int ggml_type); /* block size > 1 */
/* Bytes of a row of ne0 elements; false when ne0 is not a multiple of the
 * block size, negative, the type unusable or the result overflows. */
bool gguf_row_bytes(int ggml_type, int64_t ne0, uint64_t *out);
/* The mp_dtype a plain ggml type reads as (F32, F16, BF16, I8..I64, F64),
 * MP_DT_GGML for block types, MP_DT_INVALID for unusable ids. */
mp_dtype gguf_type_dtype(int ggml_type);
/* Name of a metadata value type ("UINT32", "STRING", ...), NULL if invalid. */
const char *gguf_value_type_name(int vtype);

/* Opens one GGUF file into a zeroed *w (see above). */
int gguf_open(const char *path, mp_weights *w, mp_error *err);

/* File facts kept by gguf_open (w must come from gguf_open). */
typedef struct gguf_info {
    uint32_t version;
    uint32_t alignment;
    uint64_t data_start; /* absolute offset of the tensor data section */
    uint64_t n_kv;
    json_t *types; /* key -> "UINT32" / "STRING" / "[STRING]" / "[[INT32]]" */
} gguf_info;
const gguf_info *gguf_info_of(const mp_weights *w);
/* GGUF type of a metadata key as above; NULL when absent. */
const char *gguf_meta_type(const mp_weights *w, const char *key);

/* ---- dequantization (gguf_dequant.c) ---- */

/* Types gguf_dequant handles: F32 F16 BF16 F64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
 * Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ4_NL IQ4_XS TQ1_0 TQ2_0 MXFP4 NVFP4. */
bool gguf_can_dequant(int ggml_type);
/* Dequantize n elements (a multiple of the block size) from src, which
 * holds src_bytes (must be exactly n/block*bytes) into dst as out =
 * MP_DT_F32, MP_DT_F16 or MP_DT_BF16 (rounded to nearest even; f16/bf16
 * sources to the same dtype are copied bit-exactly). Bit-identical to
 * ggml's dequantize_row_* and gguf-py's gguf.quants.dequantize. */
int gguf_dequant(int ggml_type, const void *src, size_t src_bytes, int64_t n, mp_dtype out,
                 void *dst, mp_error *err);
/* Read tensor t of w (a GGUF tensor: dtype F32/F16/BF16/F64 or MP_DT_GGML)
 * and dequantize all of it into dst (numel * out element size bytes),
 * streaming in bounded chunks. */
int gguf_tensor_dequant(const mp_weights *w, const mp_tensor *t, mp_dtype out, void *dst,
                        mp_error *err);
/* ggml type of a tensor of w (-1 if none): t->ggml_type for MP_DT_GGML, else
 * the plain type matching t->dtype. */
int gguf_tensor_type(const mp_tensor *t);

/* ---- names and config (gguf_names.c) ---- */

/* GGUF tensor name -> HF name for llama-family archs (llama, mistral, qwen2,
 * qwen3, and their moe routers). Returns 0 and writes out; 1 when the tensor
 * has no HF counterpart (rope_freqs); -1 when the name is not mapped. */
int gguf_name_to_hf(const char *arch, const char *gguf_name, char *out, size_t outsz);
/* Whether llama.cpp's converter permuted attn_q/attn_k rows for this arch. */
bool gguf_arch_permutes_qk(const char *arch);
/* Undo / redo convert_hf_to_gguf.py's Q/K row permutation in place on nrows
 * rows of row_bytes each (any element type: dequantized rows, whole
 * quantized rows, or a bias with row_bytes = element size). n_head is
 * n_head for attn_q and n_head_kv for attn_k; nrows must be a multiple of
 * 2 * n_head. */
int gguf_qk_unpermute(void *rows, int64_t nrows, size_t row_bytes, int64_t n_head, mp_error *err);
int gguf_qk_permute(void *rows, int64_t nrows, size_t row_bytes, int64_t n_head, mp_error *err);
/* config.json for a llama-family GGUF's metadata (a new reference).
 * Error "unsupported_format" for other archs, "bad_header" when required
 * keys are missing. */
json_t *gguf_hf_config(const json_t *metadata, mp_error *err);
/* Same, plus what the tensor table tells: tie_word_embeddings (no
 * output.weight) and vocab_size from token_embd when metadata lacks it. */
json_t *gguf_hf_config_weights(const mp_weights *w, mp_error *err);

#endif
