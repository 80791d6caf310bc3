/*
 * pytorch.h - PyTorch checkpoints (torch.save zip >= 1.6 and the legacy
 * pre-zip stream). pt_open unpickles data.pkl with a
 * fixed allowlist of torch globals, never executing anything, and turns each
 * tensor of the state dict into an mp_tensor that points at its storage's
 * bytes in the file (views keep their strides and storage offset).
 *
 * Tied weights: tensors on one storage share storage_id (per file), so a
 * consumer can tell a tied weight (same view) from a slice of a fused
 * storage (same storage, different view) with the helpers below.
 */
#ifndef MP_LOADER_PYTORCH_H
#define MP_LOADER_PYTORCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"
#include "util/tensor/tensor.h"
#include "util/error.h"

/* Opens one checkpoint (zip or legacy) into a zeroed *w. Errors as
 * weights_open's; "unsafe_pickle" names the refused global. */
int pt_open(const char *path, mp_weights *w, mp_error *err);

/* Identity of the bytes a tensor starts at: the storage and the byte offset
 * of element 0 in it. torch's data_ptr() grouping (used by the HF/SGLang
 * .bin -> safetensors conversion to drop tied duplicates) is equality of
 * this key. */
typedef struct pt_view_key {
    uint32_t file_index;
    int64_t storage_id; /* -1: no shared storage, never equal to another */
    uint64_t byte_offset;
} pt_view_key;

void pt_view_key_of(const mp_tensor *t, pt_view_key *k);
/* Same storage, same byte offset (data_ptr equality). */
bool pt_same_data_ptr(const mp_tensor *a, const mp_tensor *b);
/* Same storage, offset, dtype, shape and strides: the very same view, so
 * the materialized bytes are identical (a tied weight). */
bool pt_same_view(const mp_tensor *a, const mp_tensor *b);
/* Same backing storage (possibly different views of it). */
bool pt_same_storage(const mp_tensor *a, const mp_tensor *b);

/* Runs one data.pkl-style pickle under the torch allowlist and resolves
 * the state dict, without any storage data. Returns the tensor count or -1
 * with err ("unsafe_pickle" names the refused global). legacy: persistent
 * ids are the pre-zip 6-tuples. For tests and fuzzing. */
long pt_check_pickle(const uint8_t *buf, size_t len, bool legacy, mp_error *err);

#endif
