/*
 * tensor.h - the one tensor descriptor every weight-file reader produces
 * (safetensors, PyTorch pickle, GGUF, npy) and every consumer (convert,
 * inspect, shard, warm_load, modelprep-tensors) takes.
 *
 * A descriptor says where a tensor's bytes are in which file and how to read
 * them; it never holds the bytes. Views (PyTorch strides and storage offsets)
 * are kept as they are so that a consumer can materialize them, and so that
 * tied weights are recognizable by (file, storage) identity.
 */
#ifndef MP_UTIL_TENSOR_TENSOR_H
#define MP_UTIL_TENSOR_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MP_MAX_DIMS 8

/* safetensors dtype strings, in the order the reference sorts them, then the
 * ggml block-quantized types (GGUF) that have no safetensors name. */
typedef enum mp_dtype {
    MP_DT_INVALID = 0,
    MP_DT_BOOL,
    MP_DT_F4,
    MP_DT_F6_E2M3,
    MP_DT_F6_E3M2,
    MP_DT_U8,
    MP_DT_I8,
    MP_DT_F8_E5M2,
    MP_DT_F8_E4M3,
    MP_DT_F8_E8M0,
    MP_DT_F8_E4M3FNUZ,
    MP_DT_F8_E5M2FNUZ,
    MP_DT_I16,
    MP_DT_U16,
    MP_DT_F16,
    MP_DT_BF16,
    MP_DT_I32,
    MP_DT_U32,
    MP_DT_F32,
    MP_DT_C64,
    MP_DT_F64,
    MP_DT_I64,
    MP_DT_U64,
    MP_DT_GGML, /* a ggml quantized type: see mp_tensor.ggml_type */
    MP_DT_COUNT
} mp_dtype;

typedef enum mp_format {
    MP_FMT_UNKNOWN = 0,
    MP_FMT_SAFETENSORS,
    MP_FMT_PT_ZIP,    /* torch.save >= 1.6 */
    MP_FMT_PT_LEGACY, /* torch.save pre-zip pickle stream */
    MP_FMT_GGUF,
    MP_FMT_NPY,
} mp_format;

typedef struct mp_tensor {
    char *name; /* owned, NUL-terminated */
    mp_dtype dtype;
    int ggml_type;                /* valid when dtype == MP_DT_GGML, else -1 */
    int ndim;                     /* 0 for a scalar */
    int64_t shape[MP_MAX_DIMS];   /* logical shape, row-major (outermost first) */
    int64_t strides[MP_MAX_DIMS]; /* in elements; contiguous row-major when !is_view */
    int64_t storage_offset;       /* in elements, from the storage's start */
    bool is_view;                 /* strides/offset not plain contiguous */
    /* Where the backing bytes live. For safetensors/GGUF/npy: the tensor's own
     * byte range. For PyTorch: the whole storage's byte range (a view selects
     * from it using strides and storage_offset). */
    uint32_t file_index;  /* index into the reader's file list */
    uint64_t data_offset; /* absolute byte offset in that file */
    uint64_t data_bytes;  /* bytes of that range */
    uint64_t nbytes;      /* bytes of the materialized, contiguous tensor */
    int64_t storage_id;   /* tensors sharing a storage share this id; -1 if none */
} mp_tensor;

/* Name of a dtype as safetensors spells it ("F32", "BF16", "BOOL", ...).
 * For MP_DT_GGML returns "GGML" (use ggml_type_name for the block type). */
const char *mp_dtype_name(mp_dtype dt);
/* Parse a safetensors dtype string; MP_DT_INVALID when unknown. */
mp_dtype mp_dtype_from_name(const char *s);
/* Bits per element (4 for F4, 6 for F6_*, 8 for BOOL/U8...). 0 for GGML. */
unsigned mp_dtype_bits(mp_dtype dt);
bool mp_dtype_is_float(mp_dtype dt);

/* Element count with overflow check: false when the product overflows
 * int64 or any dim is negative. */
bool mp_shape_numel(const int64_t *shape, int ndim, uint64_t *out);
/* Byte size of a contiguous tensor of dtype; false on overflow or when the
 * bit count is not a multiple of 8. */
bool mp_tensor_bytes(mp_dtype dt, const int64_t *shape, int ndim, uint64_t *out);

/* Sets strides to contiguous row-major for t->shape, storage_offset 0 and
 * is_view false (strides of an empty tensor may be 0). */
void mp_tensor_set_contiguous(mp_tensor *t);

void mp_tensor_free_fields(mp_tensor *t);

#endif
