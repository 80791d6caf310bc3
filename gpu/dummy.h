/*
 * dummy.h - the dummy-weights generator of load_format "dummy", shared by
 * the host backend and the CUDA kernel so that both write identical bytes.
 *
 * SGLang's initialize_dummy_weights fills each parameter uniformly in
 * [low, high] from torch's generator; we cannot reproduce torch's Philox
 * streams bit for bit on both backends, so we define our own counter-based
 * generator with the same intent (uniform in [low, high], a fixed seed gives
 * the same weights every time, independent of thread or block layout):
 *
 *   splitmix64(x):  z = x + 0x9e3779b97f4a7c15
 *                   z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
 *                   z = (z ^ (z >> 27)) * 0x94d049bb133111eb
 *                   return z ^ (z >> 31)                   (all mod 2^64)
 *   fnv1a64(name):  FNV-1a 64 over the name's bytes (offset basis
 *                   0xcbf29ce484222325, prime 0x100000001b3)
 *   tensor seed:    tseed = splitmix64(seed ^ fnv1a64(name))
 *   element i:      u = (float)(splitmix64(tseed + i) >> 40) * 2^-24
 *                   value = low + (high - low) * u
 *                   in float32, each operation rounded to nearest (no FMA
 *                   contraction: CUDA uses __fsub_rn/__fmul_rn/__fadd_rn)
 *   stored as:      F32 as is; F16 / BF16 rounded to nearest even.
 *
 * u is in [0, 1 - 2^-24], so values lie in [low, high] (rounding may reach
 * high). A tensor split across tensor-parallel ranks can either use the same
 * name per rank (each rank's shard starts at element 0) or pass the index
 * of the shard's first element as `first` to gpu_fill_dummy.
 */
#ifndef MP_GPU_DUMMY_H
#define MP_GPU_DUMMY_H

#include <stddef.h>
#include <stdint.h>

#include "util/tensor/scalar.h"
#include "util/tensor/tensor.h"

SCALAR_HD uint64_t gpu_dummy_splitmix64(uint64_t x) {
    uint64_t z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Value number i of the tensor with seed tseed, as float32. */
SCALAR_HD float gpu_dummy_value(uint64_t tseed, uint64_t i, float low, float high) {
    float u = SCALAR_FMUL((float)(uint32_t)(gpu_dummy_splitmix64(tseed + i) >> 40),
                          5.9604644775390625e-8f); /* 2^-24 */
    return SCALAR_FADD(low, SCALAR_FMUL(SCALAR_FSUB(high, low), u));
}

/* FNV-1a 64 of a NUL-terminated name. */
uint64_t gpu_dummy_fnv1a64(const char *name);
/* Per-tensor seed: splitmix64(seed ^ fnv1a64(name)). */
uint64_t gpu_dummy_tensor_seed(uint64_t seed, const char *name);
/* Writes values first .. first+n-1 of tensor seed tseed into dst as dt
 * (F32, F16 or BF16; little-endian). Returns 0, or -1 for another dtype. */
int gpu_dummy_fill_cpu(void *dst, mp_dtype dt, uint64_t n, uint64_t first, uint64_t tseed,
                       float low, float high);

#endif
