/*
 * safetensors.h - the safetensors reader (st_open), a mapped variant, a streaming writer that
 * reproduces the reference's bytes exactly, and the sharded-checkpoint index
 * (model.safetensors.index.json).
 *
 * Layout and the reference's rules: /work/shared/reference/weight-formats.md §1.
 */
#ifndef MP_LOADER_SAFETENSORS_H
#define MP_LOADER_SAFETENSORS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"

#define ST_MAX_HEADER 100000000ull /* the reference's MAX_HEADER_SIZE (10^8) */

/* Parse and validate a header already in memory. `header` is the N bytes
 * after the length prefix, file_size the whole file's length. Fills w's
 * tensors (file_index 0, absolute data_offset) and metadata; used by st_open
 * and the fuzzer. */
int st_parse_header(const char *header, size_t n, uint64_t file_size, mp_weights *w, mp_error *err);

/* Opens one .safetensors file into a zeroed *w (weights_open does this for
 * any format; this skips detection). Errors as weights_open's. */
int st_open(const char *path, mp_weights *w, mp_error *err);
/* Like st_open, and also maps the file read-only; st_data() then points at a
 * tensor's bytes in the map and weights_read copies from it (no syscalls). */
int st_open_mmap(const char *path, mp_weights *w, mp_error *err);
/* Pointer to t's bytes when w came from st_open_mmap, else NULL. */
const void *st_data(const mp_weights *w, const mp_tensor *t);

/* --- writer ---------------------------------------------------------------
 * The caller gives every tensor up front; the writer sorts them like the
 * reference (dtype alignment descending, then name byte-wise), writes the
 * header, then takes the data as one byte stream in that file order
 * (st_writer_order tells which input tensor comes k-th). Output goes to
 * "<path>.tmp"; st_writer_finish checks the byte count, fsyncs and renames;
 * st_writer_abort unlinks. Both free the writer. */
typedef struct st_wtensor {
    const char *name;
    mp_dtype dtype;
    int ndim;
    int64_t shape[MP_MAX_DIMS];
} st_wtensor;

typedef struct st_writer st_writer;

/* metadata: a JSON object of string values (written as __metadata__, keys
 * sorted), or NULL for none. Errors: "bad_request" (duplicate or reserved
 * name, bad dtype/shape, non-string metadata, invalid UTF-8), "too_large",
 * "io_error". */
int st_writer_open(const char *path, const st_wtensor *ts, size_t n, const json_t *metadata,
                   st_writer **out, mp_error *err);
/* Index into the caller's array of the tensor written k-th (0 <= k < n). */
size_t st_writer_order(const st_writer *w, size_t k);
/* Byte size of the data section (sum of all tensors) and header length N. */
uint64_t st_writer_data_bytes(const st_writer *w);
uint64_t st_writer_header_len(const st_writer *w);
/* Data bytes in file order, any chunking. */
int st_writer_write(st_writer *w, const void *buf, size_t len, mp_error *err);
int st_writer_finish(st_writer *w, mp_error *err);
void st_writer_abort(st_writer *w);

/* --- sharded index -------------------------------------------------------- */
typedef struct st_index {
    char **files; /* distinct shard file names, in sorted order */
    size_t nfiles;
    char **names;      /* weight_map keys, sorted */
    uint32_t *file_of; /* names[i] lives in files[file_of[i]] */
    size_t nnames;
    uint64_t total_size; /* metadata.total_size, 0 when absent */
    bool has_total_size;
    json_t *metadata; /* the "metadata" object as read (owned), or NULL */
} st_index;

/* Errors: "not_found", "bad_header" (not JSON, weight_map missing, a file
 * name with a directory part / "..", non-string values), "too_large". */
int st_index_read(const char *path, st_index *idx, mp_error *err);
/* Writes {"metadata": {"total_size": N}, "weight_map": {...}} the way
 * huggingface_hub does (indent 2, keys sorted, trailing newline), to a temp
 * name then renamed. idx->metadata, when set, is written instead of the
 * total_size-only object (total_size is still set from idx). */
int st_index_write(const char *path, const st_index *idx, mp_error *err);
void st_index_free(st_index *idx);

/* True when s is a usable shard file name: no '/', not "." or "..", not
 * empty, no control characters. */
bool st_plain_file_name(const char *s);

#endif
