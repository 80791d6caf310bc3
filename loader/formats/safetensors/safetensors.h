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
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/formats/weights.h"
#include "util/error.h"

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
/* Or, instead of st_writer_write: len bytes of input tensor i (the index
 * into ts of st_writer_open) at byte off of its data, in any order, so that
 * a producer of several tensors at once (quantize) needs no buffering. The
 * writer counts the bytes; writing one range twice is the caller's bug. */
int st_writer_pwrite(st_writer *w, size_t i, uint64_t off, const void *buf, size_t len,
                     mp_error *err);
int st_writer_finish(st_writer *w, mp_error *err);
void st_writer_abort(st_writer *w);
/* The end of a writer whatever happened: finish when rc is 0, else abort
 * (w may be NULL); returns finish's result or rc. */
int st_writer_end(st_writer *w, int rc, mp_error *err);

/* --- sharded index -------------------------------------------------------- */
typedef struct st_index {
    char **files; /* distinct shard file names, in sorted order */
    size_t nfiles;
    char **names;      /* weight_map keys (sorted when read; any order to write) */
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
 * huggingface_hub does (indent 2, keys sorted whatever idx's order, trailing newline), to a temp
 * name then renamed. idx->metadata, when set, is written instead of the
 * total_size-only object (total_size is still set from idx). */
int st_index_write(const char *path, const st_index *idx, mp_error *err);
void st_index_free(st_index *idx);

/* True when s is a usable shard file name: no '/', not "." or "..", not
 * empty, no control characters. */
bool st_plain_file_name(const char *s);

/* ---- encrypted safetensors (st_crypt.c, stc_ prefix) ----------------------
 *
 * Encrypted safetensors ("aes-256-gcm-chunked-v1"): a writer
 * with the same shape as st_writer, and the reader side the loader uses to
 * verify and decrypt the data region chunk by chunk.
 *
 * SGLang names decrypt() and safetensors_encrypted_weights_iterator but
 * never implemented them, so the format is ours (README.md, "Encrypted
 * safetensors", is the normative description). In short:
 *
 *  - The file is an ordinary, valid safetensors file: the 8-byte length, the
 *    JSON header and the data offsets are exactly what st_writer would write
 *    for the plaintext, so header-only readers (inspect) work without a key.
 *  - __metadata__ carries "encryption": "aes-256-gcm-chunked-v1",
 *    "enc_chunk_bytes" (decimal; a power of two in [4 KiB, 64 MiB]),
 *    "enc_nonce" (24 hex digits: a random 96-bit per-file nonce) and
 *    "enc_tags" (32 hex digits per chunk, chunk order).
 *  - The data region is cut into chunks of enc_chunk_bytes (the last one may
 *    be shorter). Chunk i is AES-256-GCM encrypted on its own: IV = enc_nonce
 *    with its last 8 bytes XORed with i (big-endian), AAD = the 32-byte
 *    header digest below, tag = enc_tags[i]. Ciphertext is as long as the
 *    plaintext, so offsets do not move; chunks decrypt in any order, in
 *    parallel or as a stream, and each one is verified before its bytes are
 *    used.
 *  - Header digest = SHA-256 of the compact JSON (keys sorted, no spaces,
 *    UTF-8 unescaped) {"metadata": <__metadata__ without enc_tags>,
 *    "tensors": [[name, dtype, [shape...], begin, end], ...in data order]}.
 *    Renaming, reshaping or moving a tensor in the header therefore fails
 *    every chunk, as does reordering, truncating or flipping any data byte.
 */

#define STC_SCHEME "aes-256-gcm-chunked-v1"
#define STC_KEY_BYTES 32
#define STC_NONCE_BYTES 12
#define STC_TAG_BYTES 16
#define STC_DEFAULT_CHUNK (1u << 20)
#define STC_MIN_CHUNK (4u << 10)
#define STC_MAX_CHUNK (64u << 20)

/* Reads a key file: exactly 32 raw bytes, or 64 hex digits (surrounding
 * whitespace allowed). Errors: "not_found", "bad_key". */
int stc_key_load(const char *path, unsigned char key[STC_KEY_BYTES], mp_error *err);

/* Resolves a key file path for a job param (field names it in errors): an
 * absolute path, or one relative to base_dir, that after resolving links
 * lies under data_dir or one of roots (NULL-terminated, realpath'd). out
 * holds PATH_MAX bytes. Errors: "not_found", "bad_path". */
int stc_key_resolve(const char *given, const char *base_dir, const char *data_dir,
                    const char *const *roots, const char *field, char *out, mp_error *err);

/* Encrypts the plain safetensors file in into out (which may be the same
 * path: it is replaced atomically). chunk_bytes 0: the default. */
int stc_encrypt_file(const char *in, const char *out, const unsigned char key[STC_KEY_BYTES],
                     uint64_t chunk_bytes, mp_error *err);

/* ---- writer (mirrors st_writer: same ordering and header) ---- */
typedef struct stc_writer stc_writer;
/* chunk_bytes 0 means STC_DEFAULT_CHUNK. metadata may be NULL; it must not
 * already use the enc_* / encryption keys. Output goes to "<path>.enc.tmp",
 * then "<path>.enc" (finished by st_writer), then, once the tags are in the
 * header, is renamed to path. */
int stc_writer_open(const char *path, const st_wtensor *ts, size_t n, const json_t *metadata,
                    const unsigned char key[STC_KEY_BYTES], uint64_t chunk_bytes, stc_writer **out,
                    mp_error *err);
size_t stc_writer_order(const stc_writer *w, size_t k);
int stc_writer_write(stc_writer *w, const void *buf, size_t len, mp_error *err);
int stc_writer_finish(stc_writer *w, mp_error *err);
void stc_writer_abort(stc_writer *w);

/* ---- reader ---- */
typedef struct stc_file {
    bool encrypted;
    uint64_t chunk_bytes;
    unsigned char nonce[STC_NONCE_BYTES];
    unsigned char *tags; /* nchunks * 16, owned */
    uint64_t nchunks;
    uint64_t data_start; /* absolute offset of the data region */
    uint64_t data_len;
    unsigned char aad[32];
} stc_file;

/* Reads the encryption parameters of a safetensors file w opened with
 * st_open (fd = w->fds[0]). A plain file gives encrypted = false. Errors:
 * "bad_header" (malformed enc_* keys, tag count disagreeing with the data
 * length, an unknown scheme). */
int stc_file_open(const mp_weights *w, stc_file *f, mp_error *err);
void stc_file_free(stc_file *f);
/* True when __metadata__ says the file is encrypted (any scheme). */
bool stc_is_encrypted(const mp_weights *w);

/* Decrypts chunk idx: ct holds its n ciphertext bytes (n is the chunk's
 * length); plaintext goes to pt (may equal ct). "decryption_failed" when the
 * tag does not verify (wrong key, tampered data or header). */
int stc_decrypt_chunk(const stc_file *f, const unsigned char key[STC_KEY_BYTES], uint64_t idx,
                      const void *ct, size_t n, void *pt, mp_error *err);
/* Length of chunk idx. */
size_t stc_chunk_len(const stc_file *f, uint64_t idx);

/* A reader's one-chunk cache, so sequential reads decrypt each chunk once. */
typedef struct stc_cache {
    unsigned char *buf; /* chunk_bytes, owned */
    uint64_t idx;
    bool valid;
} stc_cache;
void stc_cache_free(stc_cache *c);
/* Reads len plaintext bytes at absolute file offset off (inside the data
 * region) of fd into dst, verifying every chunk it touches. */
int stc_read(const stc_file *f, int fd, const unsigned char key[STC_KEY_BYTES], uint64_t off,
             void *dst, size_t len, stc_cache *cache, mp_error *err);

#endif
