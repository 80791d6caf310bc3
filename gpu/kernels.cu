/*
 * kernels.cu - the CUDA kernels of the CUDA backend: dtype casts, ggml
 * dequantization and the dummy-weights fill. The arithmetic is the shared
 * code of util/tensor/scalar.h, util/tensor/ggml_blocks.h and dummy.h, so every kernel writes
 * exactly the bytes the host backend writes for the same input (tests/cuda checks it).
 *
 * One thread per output element with a grid-stride loop over 64-bit
 * indices: these kernels are bound by memory bandwidth, not by the
 * redundant block-header loads of neighbouring threads (cached).
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/dummy.h"
#include "gpu/kernels.h"
#include "util/tensor/ggml_blocks.h"
#include "util/tensor/scalar.h"
#include "util/tensor/tensor.h"

namespace {

constexpr int kThreads = 256;
constexpr uint64_t kMaxBlocks = 65535ull * 16;

unsigned grid_for(uint64_t n) {
    uint64_t b = (n + kThreads - 1) / kThreads;
    return (unsigned)(b < kMaxBlocks ? (b ? b : 1) : kMaxBlocks);
}

__device__ inline float load_elem(const void *src, int dt, uint64_t i) {
    switch (dt) {
    case MP_DT_F32:
        return ((const float *)src)[i];
    case MP_DT_F16:
        return scalar_f16_to_f32(((const uint16_t *)src)[i]);
    case MP_DT_BF16:
        return scalar_bf16_to_f32(((const uint16_t *)src)[i]);
    case MP_DT_F8_E4M3:
        return scalar_e4m3_to_f32(((const uint8_t *)src)[i]);
    case MP_DT_F8_E5M2:
        return scalar_e5m2_to_f32(((const uint8_t *)src)[i]);
    default:
        return 0.0f;
    }
}

/* F32 is stored as its bits so that a NaN payload survives untouched. */
__device__ inline void store_elem(void *dst, int dt, uint64_t i, float v) {
    switch (dt) {
    case MP_DT_F32:
        ((uint32_t *)dst)[i] = scalar_f32_bits(v);
        break;
    case MP_DT_F16:
        ((uint16_t *)dst)[i] = scalar_f32_to_f16(v);
        break;
    case MP_DT_BF16:
        ((uint16_t *)dst)[i] = scalar_f32_to_bf16(v);
        break;
    default:
        break;
    }
}

__global__ void k_cast(void *dst, int dst_dt, const void *src, int src_dt, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        store_elem(dst, dst_dt, i, load_elem(src, src_dt, i));
}

__global__ void k_copy16(uint16_t *dst, const uint16_t *src, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

__global__ void k_dequant(void *dst, int dst_dt, const uint8_t *src, int t, unsigned be,
                          unsigned bb, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        uint64_t b = i / be;
        store_elem(dst, dst_dt, i, ggml_blk_value(t, src + b * bb, (unsigned)(i - b * be)));
    }
}

__global__ void k_dummy(void *dst, int dt, uint64_t n, uint64_t first, uint64_t tseed, float low,
                        float high) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        store_elem(dst, dt, i, gpu_dummy_value(tseed, first + i, low, high));
}

} // namespace

extern "C" int gpuk_cast(void *dst, int dst_dt, const void *src, int src_dt, uint64_t n,
                         void *stream) {
    cudaStream_t s = (cudaStream_t)stream;
    if (dst_dt == src_dt) {
        /* Identity: a byte copy (in place is a no-op). */
        if (dst == src) return 0;
        size_t es = dst_dt == MP_DT_F32 ? 4 : dst_dt == MP_DT_F16 || dst_dt == MP_DT_BF16 ? 2 : 1;
        if (es == 2) {
            k_copy16<<<grid_for(n), kThreads, 0, s>>>((uint16_t *)dst, (const uint16_t *)src, n);
            return (int)cudaGetLastError();
        }
        return (int)cudaMemcpyAsync(dst, src, n * es, cudaMemcpyDeviceToDevice, s);
    }
    k_cast<<<grid_for(n), kThreads, 0, s>>>(dst, dst_dt, src, src_dt, n);
    return (int)cudaGetLastError();
}

extern "C" int gpuk_dequant(void *dst, int dst_dt, const void *src, int ggml_type, uint64_t n,
                            void *stream) {
    unsigned be = ggml_blk_elems(ggml_type), bb = ggml_blk_bytes(ggml_type);
    if (!be) return (int)cudaErrorInvalidValue;
    k_dequant<<<grid_for(n), kThreads, 0, (cudaStream_t)stream>>>(dst, dst_dt, (const uint8_t *)src,
                                                                  ggml_type, be, bb, n);
    return (int)cudaGetLastError();
}

extern "C" int gpuk_fill_dummy(void *dst, int dt, uint64_t n, uint64_t first, uint64_t tseed,
                               float low, float high, void *stream) {
    k_dummy<<<grid_for(n), kThreads, 0, (cudaStream_t)stream>>>(dst, dt, n, first, tseed, low,
                                                                high);
    return (int)cudaGetLastError();
}
