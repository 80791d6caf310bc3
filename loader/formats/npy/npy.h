/*
 * npy.h - NumPy .npy files (v1/v2/v3) and the
 * vLLM/SGLang "npcache" directory: one np.save file per tensor, named by the
 * tensor's name verbatim (no extension, as np_cache_weights_iterator writes
 * them), plus weight_names.json (a JSON list of names in load order, written
 * last: its presence marks the cache complete).
 *
 * Dtypes numpy cannot name (BF16, the F8 family) are stored as their bit
 * patterns ('<u2' / '|u1') and the real dtype goes into a sidecar,
 * weight_dtypes.json ({"name": "BF16", ...}), which SGLang ignores.
 */
#ifndef MP_LOADER_NPY_H
#define MP_LOADER_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"

#define NPY_MAX_HEADER (1u << 20) /* numpy itself refuses > 10000 untrusted */

/* Opens one .npy file into a zeroed *w: one tensor named after the file. */
int npy_open(const char *path, mp_weights *w, mp_error *err);

/* Parse the bytes of a .npy preamble+header (buf holds at least the first
 * `len` bytes of the file). Fills dtype, ndim, shape, strides/is_view (for
 * fortran_order), nbytes and data_offset (= preamble + header length).
 * Errors: "bad_header", "truncated" (need more bytes), "unsupported_format"
 * (big-endian, object, structured or complex128 arrays). */
int npy_parse_header(const unsigned char *buf, size_t len, mp_tensor *t, mp_error *err);

/* The exact bytes np.save writes before the data for a C-order array
 * (version 1.0, or 2.0 when the header needs it). dtype must have a numpy
 * descr, or be stored as bits (see above). Returns the length, 0 on error. */
size_t npy_header(mp_dtype dt, const int64_t *shape, int ndim, char *out, size_t cap,
                  mp_error *err);
/* The numpy descr ('<f4') a dtype is written with, or NULL (F4, F6, GGML). */
const char *npy_descr(mp_dtype dt);

/* Writes one .npy file (temp name, fsync, rename). */
int npy_write(const char *path, mp_dtype dt, const int64_t *shape, int ndim, const void *data,
              uint64_t nbytes, mp_error *err);

/* Writes every tensor of w into dir (created if missing) in npcache layout.
 * Names must be usable as file names (no '/', not "." / ".." or one of the
 * two JSON files). Errors: "bad_request" (such a name, a duplicate, a dtype
 * numpy cannot hold), "io_error". */
int npcache_write_dir(const mp_weights *w, const char *dir, mp_error *err);
/* Opens an npcache directory (weight_names.json + one file per name; a
 * "<name>.npy" file is accepted too). Fills a zeroed *w, format MP_FMT_NPY,
 * one file per tensor in weight_names.json order. */
int npcache_open(const char *dir, mp_weights *w, mp_error *err);

#endif
