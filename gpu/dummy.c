/*
 * dummy.c - the host side of the dummy-weights generator (see dummy.h for
 * the definition): name hashing, and the CPU fill the host backend uses and
 * the CUDA tests compare with.
 */
#include "gpu/dummy.h"

#include <string.h>

uint64_t gpu_dummy_fnv1a64(const char *name) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ull;
    }
    return h;
}

uint64_t gpu_dummy_tensor_seed(uint64_t seed, const char *name) {
    return gpu_dummy_splitmix64(seed ^ gpu_dummy_fnv1a64(name ? name : ""));
}

int gpu_dummy_fill_cpu(void *dst, mp_dtype dt, uint64_t n, uint64_t first, uint64_t tseed,
                       float low, float high) {
    unsigned char *p = dst;
    switch (dt) {
    case MP_DT_F32:
        for (uint64_t k = 0; k < n; k++) {
            uint32_t b = scalar_f32_bits(gpu_dummy_value(tseed, first + k, low, high));
            memcpy(p + 4 * k, &b, 4);
        }
        return 0;
    case MP_DT_F16:
    case MP_DT_BF16:
        for (uint64_t k = 0; k < n; k++) {
            float v = gpu_dummy_value(tseed, first + k, low, high);
            uint16_t h = dt == MP_DT_F16 ? scalar_f32_to_f16(v) : scalar_f32_to_bf16(v);
            memcpy(p + 2 * k, &h, 2);
        }
        return 0;
    default:
        return -1;
    }
}
