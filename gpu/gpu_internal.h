/*
 * gpu_internal.h - what gpu.c shares with its two backends (gpu_host.c,
 * gpu_cuda.c): the structures behind the opaque handles of gpu.h and the
 * backend entry points. gpu.c validates arguments (bounds, alignment,
 * dtypes) and keeps the accounting; a backend only does the work.
 */
#ifndef MP_GPU_GPU_INTERNAL_H
#define MP_GPU_GPU_INTERNAL_H

#include <pthread.h>

#include "gpu/gpu.h"

typedef struct gpu_dev {
    gpu_kind kind;
    int ordinal;       /* CUDA ordinal; host: index */
    uint64_t cap;      /* host: memory cap in bytes, 0 = none */
    uint64_t resident; /* under set->mu */
    void *stream;      /* cuda: cudaStream_t, created on first use under set->mu */
} gpu_dev;

struct gpu_set {
    gpu_kind kind;
    int n;
    pthread_mutex_t mu;
    long live;         /* arenas + fences not yet freed: a bug check in gpu_set_close */
    bool host_private; /* host arenas: anonymous THP mappings, not memfds */
    gpu_dev dev[GPU_MAX_DEVICES];
};

struct gpu_arena {
    gpu_set *set;
    int dev;
    uint64_t size;
    void *ptr; /* host: the mapping; cuda: the device pointer */
    int fd;    /* host: the memfd; -1 on cuda and for a private host arena */
};

struct gpu_fence {
    gpu_set *set;
    int dev;
    void *event; /* cuda: cudaEvent_t */
    int recorded;
};

/* Sets err code "insufficient_memory" and returns GPU_NOMEM. */
int gpu_nomem(mp_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- host backend (gpu_host.c) ---- */
int gpu_host_mem_info(const gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err);
/* priv: an anonymous (THP) mapping with no fd instead of a memfd. */
int gpu_host_arena_alloc(gpu_arena *a, bool priv, mp_error *err);
void gpu_host_arena_free(gpu_arena *a);
int gpu_host_staging_alloc(size_t bytes, void **out, mp_error *err);
void gpu_host_staging_free(void *p);
int gpu_host_cast(void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt, uint64_t n);
int gpu_host_dequant(void *dst, mp_dtype dst_dt, const void *src, int ggml_type, uint64_t n);

/* ---- CUDA backend (gpu_cuda.c, only with MP_HAVE_CUDA) ---- */
#if MP_HAVE_CUDA
/* Number of CUDA devices; 0 when the driver is missing or reports none. */
int gpu_cuda_count(void);
int gpu_cuda_describe(int ordinal, gpu_device_info *info, mp_error *err);
int gpu_cuda_mem_info(int ordinal, uint64_t *total, uint64_t *avail, mp_error *err);
int gpu_cuda_arena_alloc(gpu_arena *a, mp_error *err);
void gpu_cuda_arena_free(gpu_arena *a);
int gpu_cuda_arena_export(gpu_arena *a, char *hex, size_t hexsz, mp_error *err);
int gpu_cuda_staging_alloc(size_t bytes, void **out, mp_error *err);
void gpu_cuda_staging_free(void *p);
/* Creates device d's copy stream if it has none; call under set->mu. */
int gpu_cuda_stream_init(gpu_dev *d, mp_error *err);
void gpu_cuda_stream_destroy(gpu_dev *d);
int gpu_cuda_copy_h2d(gpu_dev *d, void *dst, const void *src, size_t n, mp_error *err);
int gpu_cuda_read(gpu_dev *d, const void *src, void *dst, size_t n, mp_error *err);
int gpu_cuda_sync(gpu_dev *d, mp_error *err);
int gpu_cuda_fence_create(gpu_dev *d, gpu_fence *f, mp_error *err);
int gpu_cuda_fence_record(gpu_dev *d, gpu_fence *f, mp_error *err);
int gpu_cuda_fence_wait(gpu_dev *d, gpu_fence *f, mp_error *err);
int gpu_cuda_fence_query(gpu_dev *d, gpu_fence *f, mp_error *err);
void gpu_cuda_fence_free(gpu_dev *d, gpu_fence *f);
int gpu_cuda_cast(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt,
                  uint64_t n, mp_error *err);
int gpu_cuda_dequant(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, int ggml_type,
                     uint64_t n, mp_error *err);
int gpu_cuda_fill_dummy(gpu_dev *d, void *dst, mp_dtype dt, uint64_t n, uint64_t first,
                        uint64_t tseed, float low, float high, mp_error *err);
bool gpu_cuda_versions_impl(int *runtime, int *driver);
#endif

#endif
