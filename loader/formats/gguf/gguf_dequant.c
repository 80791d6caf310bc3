/*
 * gguf_dequant.c - ggml block types to f32 / f16 / bf16.
 *
 * The block decoders are util/tensor/ggml_blocks.h, shared with the CUDA
 * kernels and the host backend: each follows ggml's dequantize_row_*
 * operation for operation, so that results are bit-identical to ggml and
 * to gguf-py's numpy port. The plain float types and the narrowing to
 * f16/bf16 are tensor_cast's (util/tensor/cast.h); this file adds the
 * checks and the streaming from a file.
 */
#include "loader/formats/gguf/gguf.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "util/tensor/cast.h"
#include "util/tensor/ggml_blocks.h"

/* ggml_blocks.h names the types by ggml's ids, as gguf.h does. */
#define SAME_ID(x) ((int)GGUF_T_##x == (int)GGML_BLK_##x)
_Static_assert(SAME_ID(Q4_0) && SAME_ID(Q4_1) && SAME_ID(Q5_0) && SAME_ID(Q5_1) && SAME_ID(Q8_0) &&
                   SAME_ID(Q2_K) && SAME_ID(Q3_K) && SAME_ID(Q4_K) && SAME_ID(Q5_K) &&
                   SAME_ID(Q6_K) && SAME_ID(Q8_K) && SAME_ID(IQ4_NL) && SAME_ID(IQ4_XS) &&
                   SAME_ID(TQ1_0) && SAME_ID(TQ2_0) && SAME_ID(MXFP4) && SAME_ID(NVFP4),
               "ggml type ids");
#undef SAME_ID

bool gguf_can_dequant(int t) {
    return t == GGUF_T_F32 || t == GGUF_T_F16 || t == GGUF_T_BF16 || t == GGUF_T_F64 ||
           ggml_blk_elems(t) != 0;
}

/* n elements (whole blocks) of block type t to f32. restrict, and not
 * inlined so that it holds: without it the compiler must assume each float
 * store may change the source bytes, and leaves the decoders' loops
 * scalar. */
__attribute__((noinline)) static void blocks_to_f32(int t, const uint8_t *restrict src, int64_t n,
                                                    float *restrict dst) {
    ggml_blk_decode(t, src, (uint64_t)n / ggml_blk_elems(t), dst);
}

static size_t out_elem_size(mp_dtype out) {
    return out == MP_DT_F32 ? 4 : (out == MP_DT_F16 || out == MP_DT_BF16) ? 2 : 0;
}

#define DQ_CHUNK 4096 /* elements per f32 staging chunk (a multiple of every block size) */

int gguf_dequant(int t, const void *src, size_t src_bytes, int64_t n, mp_dtype out, void *dst,
                 mp_error *err) {
    if (!gguf_can_dequant(t))
        return mp_err(err, "unsupported_format", "dequantizing %s is not supported",
                      gguf_type_name(t) ? gguf_type_name(t) : "an unknown ggml type");
    if (!out_elem_size(out))
        return mp_err(err, "unsupported_format", "cannot dequantize to %s", mp_dtype_name(out));
    uint64_t need;
    if (n < 0 || !gguf_row_bytes(t, n, &need) || need != src_bytes)
        return mp_err(err, "bad_header", "%s: %" PRId64 " elements do not match %zu source bytes",
                      gguf_type_name(t), n, src_bytes);
    mp_dtype plain = gguf_type_dtype(t);
    if (plain != MP_DT_GGML) { /* F32 F16 BF16 F64: a cast (same width: a copy) */
        tensor_cast(plain, src, out, dst, (size_t)n);
        return 0;
    }
    if (out == MP_DT_F32) {
        blocks_to_f32(t, src, n, dst);
        return 0;
    }
    float tmp[DQ_CHUNK];
    unsigned blck = ggml_blk_elems(t), bytes = ggml_blk_bytes(t);
    const uint8_t *s = src;
    uint8_t *o = dst;
    for (int64_t done = 0; done < n;) {
        int64_t k = n - done < DQ_CHUNK ? n - done : DQ_CHUNK;
        blocks_to_f32(t, s + (size_t)(done / blck) * bytes, k, tmp);
        tensor_cast(MP_DT_F32, tmp, out, o + (size_t)done * 2, (size_t)k);
        done += k;
    }
    return 0;
}

#define DQ_READ_BYTES (4u << 20)

int gguf_tensor_dequant(const mp_weights *w, const mp_tensor *t, mp_dtype out, void *dst,
                        mp_error *err) {
    int ty = gguf_tensor_type(t);
    if (ty < 0) return mp_err(err, "unsupported_format", "tensor '%s' has no ggml type", t->name);
    if (!gguf_can_dequant(ty))
        return mp_err(err, "unsupported_format", "tensor '%s': dequantizing %s is not supported",
                      t->name, gguf_type_name(ty));
    size_t osz = out_elem_size(out);
    if (!osz)
        return mp_err(err, "unsupported_format", "cannot dequantize to %s", mp_dtype_name(out));
    if (t->file_index >= w->nfiles)
        return mp_err(err, "bad_header", "tensor '%s': bad file", t->name);
    uint64_t numel, row_bytes;
    int64_t ne0 = t->ndim ? t->shape[t->ndim - 1] : 1;
    if (!mp_shape_numel(t->shape, t->ndim, &numel) || !gguf_row_bytes(ty, ne0, &row_bytes))
        return mp_err(err, "bad_header", "tensor '%s': bad shape", t->name);
    if (numel == 0) return 0;
    uint64_t rows = numel / (uint64_t)ne0;
    if (rows * row_bytes != t->data_bytes)
        return mp_err(err, "bad_header", "tensor '%s': %" PRIu64 " bytes do not match its shape",
                      t->name, t->data_bytes);
    /* Rows are whole blocks, so the tensor is one flat run of blocks: stream
     * it in chunks of whole blocks, never the whole tensor at once. */
    uint64_t blck = gguf_type_block_size(ty), bbytes = gguf_type_block_bytes(ty);
    uint64_t nblocks = t->data_bytes / bbytes;
    uint64_t per = DQ_READ_BYTES / bbytes;
    if (per > nblocks) per = nblocks;
    uint8_t *buf = malloc((size_t)(per * bbytes));
    if (!buf) return mp_err(err, "io_error", "out of memory");
    int fd = w->fds[t->file_index];
    int rc = 0;
    for (uint64_t b = 0; b < nblocks && rc == 0; b += per) {
        uint64_t k = nblocks - b < per ? nblocks - b : per;
        size_t nb = (size_t)(k * bbytes);
        rc = weights_pread(fd, buf, nb, t->data_offset + b * bbytes, err);
        if (rc == 0)
            rc = gguf_dequant(ty, buf, nb, (int64_t)(k * blck), out,
                              (uint8_t *)dst + (size_t)(b * blck) * osz, err);
    }
    free(buf);
    return rc;
}
