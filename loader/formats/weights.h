/*
 * weights.h - open any weight file (safetensors, PyTorch zip or legacy,
 * GGUF, npy) and get the same thing back: a list of files and a table of
 * mp_tensor descriptors, plus a way to read one tensor's bytes.
 *
 * This is the consumer API. weights_open detects the format from the file's
 * first bytes and hands it to that format's reader, found in the table of
 * loader/formats/registry.c (readers register there: formats_internal.h).
 * A caller that knows the format can call a reader directly through its
 * family header (safetensors.h, pytorch.h, gguf.h, npy.h), which also holds
 * what only that family has (writers, GGUF metadata, ...).
 */
#ifndef MP_LOADER_WEIGHTS_H
#define MP_LOADER_WEIGHTS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "util/tensor/tensor.h"
#include "util/error.h"

/* A read-only MAP_SHARED mapping of a whole file, made by weights_map_file;
 * base NULL when the file is not mapped (weights_read then uses pread). */
typedef struct mp_file_map {
    void *base;
    uint64_t len; /* the file's size when it was mapped */
} mp_file_map;

typedef struct mp_weights {
    mp_format format;
    char **files; /* owned paths; files[t.file_index] backs tensor t */
    int *fds;     /* one open fd per file (O_RDONLY|O_CLOEXEC) */
    uint32_t nfiles;
    mp_tensor *tensors; /* owned */
    size_t ntensors;
    json_t *metadata; /* owned: safetensors __metadata__, GGUF key/values, or NULL */
    void *impl;       /* format-private state, freed by the format */
    void (*impl_free)(void *impl);
    mp_file_map *maps; /* nfiles entries once a file is added; see weights_map_file */
} mp_weights;

/* Detect and open. Error codes: "not_found", "unsupported_format",
 * "bad_header", "truncated", "unsafe_pickle", "too_large", "io_error". */
int weights_open(const char *path, mp_weights **out, mp_error *err);
mp_format weights_detect(const char *path, mp_error *err);
void weights_close(mp_weights *w);

/* Read the tensor's materialized bytes: contiguous, row-major, little-endian
 * (a view is gathered through its strides). dst must hold t->nbytes. */
int weights_read(const mp_weights *w, const mp_tensor *t, void *dst, mp_error *err);

/* Frees everything *w owns (closes fds, runs impl_free) and zeroes it; safe
 * on a zeroed or half-filled struct: what a caller of a family's *_open on
 * its own mp_weights ends with. weights_close = this + free(w). */
void weights_free_fields(mp_weights *w);
/* Appends a zeroed tensor (ggml_type and storage_id -1) for a table built
 * by hand, as readers and the dummy-weights source do; the pointer is valid
 * until the next call. */
mp_tensor *weights_add_tensor(mp_weights *w, mp_error *err);
/* pread exactly len bytes at off (retries short reads and EINTR).
 * Errors: "truncated" at end of file, "io_error". */
int weights_pread(int fd, void *buf, size_t len, uint64_t off, mp_error *err);

/* Public because consumers that stream whole files (convert, shard, the
 * Redis publisher) read faster through a mapping.
 * Maps file i whole, read-only, so that weights_read copies tensors out of
 * the page cache with memcpy instead of pread (faster: no per-call copy
 * setup, and the kernel maps large page-cache folios with huge entries).
 * Best effort: returns 0 and leaves the file unmapped when it is empty or
 * mmap fails; -1 only for a bad index. weights_read checks the file's
 * current size before touching the mapping, so a file truncated after
 * opening fails with "truncated" rather than SIGBUS (a truncation racing
 * with the copy itself can still fault, as with any mapped file). */
int weights_map_file(mp_weights *w, uint32_t i, mp_error *err);

#endif
