/*
 * kernels.h - the C entry points of kernels.cu (CUDA builds only). Each
 * launches one kernel on `stream` (a cudaStream_t) and returns the
 * cudaError_t of the launch (0 = cudaSuccess); completion is the stream's.
 * Pointers are device pointers; arguments were checked by gpu.c.
 * dtypes are mp_dtype values, ggml types the ids of util/tensor/ggml_blocks.h.
 */
#ifndef MP_GPU_KERNELS_H
#define MP_GPU_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int gpuk_cast(void *dst, int dst_dt, const void *src, int src_dt, uint64_t n, void *stream);
int gpuk_dequant(void *dst, int dst_dt, const void *src, int ggml_type, uint64_t n, void *stream);
int gpuk_fill_dummy(void *dst, int dt, uint64_t n, uint64_t first, uint64_t tseed, float low,
                    float high, void *stream);

#ifdef __cplusplus
}
#endif

#endif
