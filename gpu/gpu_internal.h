/*
 * gpu_internal.h - what gpu.c shares with its backends: the structures behind
 * the opaque handles of gpu.h and the backend table, gpu_backend. gpu.c
 * validates arguments (bounds, alignment, dtypes, overlap) and keeps the
 * accounting; a backend only does the work and trusts what reaches it.
 *
 * A backend is one const gpu_backend (like sqlite3_vfs or ggml's backend
 * interface): gpu_backend_host (gpu_host.c), gpu_backend_async (gpu_async.c,
 * the fence-faithful test backend) and gpu_backend_cuda (gpu_cuda.c, only
 * with MP_HAVE_CUDA). gpu_set_open picks one from --devices; every device of
 * a set uses it. No entry may be NULL.
 */
#ifndef MP_GPU_GPU_INTERNAL_H
#define MP_GPU_GPU_INTERNAL_H

#include <pthread.h>

#include "gpu/gpu.h"

typedef struct gpu_backend gpu_backend;

typedef struct gpu_dev {
    int index;         /* position in the set */
    int ordinal;       /* CUDA ordinal; host and async: index */
    uint64_t cap;      /* host memory backends: memory cap in bytes, 0 = none */
    uint64_t resident; /* under set->mu */
    bool ready;        /* stream_init ran (under set->mu) */
    void *stream;      /* the backend's copy stream: cudaStream_t, or the async
                          backend's queue and worker; NULL on host */
    unsigned delay_us; /* async: the most a queued operation is held back */
    /* Host memory backends: freed memfd arenas kept for reuse (gpu_arena_pool
     * in gpu.c), oldest first, and their bytes; under set->mu. Not resident:
     * they count as free memory and are released when an allocation needs
     * the room. */
    gpu_arena *pool;
    uint64_t pooled;
} gpu_dev;

/* A freed staging buffer kept for the next load (gpu_staging_alloc). */
typedef struct gpu_staging_buf {
    struct gpu_staging_buf *next;
    void *p;
    size_t bytes;
} gpu_staging_buf;

struct gpu_set {
    const gpu_backend *be;
    int n;
    pthread_mutex_t mu;
    long live;             /* arenas + fences not yet freed: a bug check in gpu_set_close */
    bool host_private;     /* host memory arenas: anonymous THP mappings, not memfds */
    char cuda_error[256];  /* why CUDA discovery found no device, "" when it did not fail */
    uint64_t pool_cap;     /* gpu_set_arena_pool: most bytes of pooled arenas, 0 = no pool */
    uint64_t pooled;       /* sum of dev[].pooled */
    uint64_t staging_cap;  /* gpu_set_staging_cap: most staging bytes at once, 0 = no cap */
    uint64_t staging_live; /* staging bytes handed out */
    gpu_staging_buf *staging_live_bufs; /* handed out (sizes for the free) */
    gpu_staging_buf *staging_cache;     /* freed staging kept for reuse */
    uint64_t staging_cached;            /* its bytes */
    gpu_dev dev[GPU_MAX_DEVICES];
};

struct gpu_arena {
    gpu_set *set;
    int dev;
    uint64_t size;
    bool priv;     /* host memory: a private anonymous mapping (decided by gpu.c) */
    void *ptr;     /* host memory: the mapping; cuda: the device pointer */
    int fd;        /* host memory: the memfd; -1 on cuda and for a private arena */
    bool exported; /* its handle went out: never pooled (an importer may map it) */
    bool reused;   /* taken from the pool: holds an earlier load's bytes */
    gpu_arena *pool_next;
};

struct gpu_fence {
    gpu_set *set;
    int dev;
    void *event;  /* cuda: cudaEvent_t */
    uint64_t seq; /* async: the stream position the fence waits for */
    int recorded;
};

/* The work of one kind of device. `d` is the device the call is for (its
 * stream already initialized where the call queues or waits); pointers are
 * arena pointers plus checked offsets. */
struct gpu_backend {
    const char *name; /* gpu_kind_name of kind */
    gpu_kind kind;
    /* Device memory is host memory: gpu.c checks free memory (mem_info, under
     * set->mu, where the cap and resident bytes live) and reserves the bytes
     * before arena_alloc, so that concurrent loads cannot together exceed a
     * cap. Otherwise arena_alloc checks free memory itself (the driver knows)
     * and mem_info is called without the lock. */
    bool host_memory;
    /* gpu_arena_host_ptr hands out the mapping. Only the host backend: the
     * async one hides it, as CUDA device memory is not CPU-addressable, so
     * that loads go through staging, copies and fences as on a GPU. */
    bool cpu_addressable;

    /* Fills name, compute_capability, pci_bus_id of info. */
    int (*describe)(const gpu_dev *d, gpu_device_info *info, mp_error *err);
    int (*mem_info)(const gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err);
    /* a->size, a->priv set; fills a->ptr, a->fd. GPU_NOMEM when it cannot fit. */
    int (*arena_alloc)(gpu_arena *a, mp_error *err);
    /* Waits for queued work that may touch the arena, then frees. */
    void (*arena_free)(gpu_arena *a);
    /* out->size and out->fd (-1) are set; fills the rest. */
    int (*arena_export)(gpu_arena *a, gpu_export *out, mp_error *err);
    int (*staging_alloc)(gpu_set *s, size_t bytes, void **out, mp_error *err);
    /* Waits for queued copies that may read p first (cudaFreeHost does). */
    void (*staging_free)(gpu_set *s, void *p);
    /* Creates the device's copy stream; called once, under set->mu. */
    int (*stream_init)(gpu_dev *d, mp_error *err);
    /* Drains and destroys it (gpu_set_close); only after stream_init. */
    void (*stream_destroy)(gpu_dev *d);
    int (*copy_h2d)(gpu_dev *d, void *dst, const void *src, size_t n, mp_error *err);
    /* Synchronous: after all queued work. */
    int (*read)(gpu_dev *d, const void *src, void *dst, size_t n, mp_error *err);
    int (*sync)(gpu_dev *d, mp_error *err);
    int (*fence_create)(gpu_dev *d, gpu_fence *f, mp_error *err);
    int (*fence_record)(gpu_dev *d, gpu_fence *f, mp_error *err);
    /* wait and query only see fences that were recorded. */
    int (*fence_wait)(gpu_dev *d, gpu_fence *f, mp_error *err);
    int (*fence_query)(gpu_dev *d, gpu_fence *f, mp_error *err);
    void (*fence_free)(gpu_dev *d, gpu_fence *f);
    int (*cast)(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt,
                uint64_t n, mp_error *err);
    int (*dequant)(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, int ggml_type,
                   uint64_t n, mp_error *err);
    int (*fill_dummy)(gpu_dev *d, void *dst, mp_dtype dt, uint64_t n, uint64_t first,
                      uint64_t tseed, float low, float high, mp_error *err);
    /* n bytes at dst set to byte (cuda: cudaMemsetAsync). */
    int (*memset)(gpu_dev *d, void *dst, int byte, uint64_t n, mp_error *err);
};

extern const gpu_backend gpu_backend_host;
extern const gpu_backend gpu_backend_async;
#if MP_HAVE_CUDA
extern const gpu_backend gpu_backend_cuda;
#endif

/* Sets err code "insufficient_memory" and returns GPU_NOMEM. */
int gpu_nomem(mp_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- host memory (gpu_host.c), shared with the async backend ---- */
int gpu_host_mem_info(const gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err);
/* priv: an anonymous (THP) mapping with no fd instead of a memfd. */
int gpu_host_arena_alloc(gpu_arena *a, bool priv, mp_error *err);
void gpu_host_arena_free(gpu_arena *a);
/* A memfd arena resized in place to bytes (a->size updated): the file is
 * truncated or fallocate'd by the difference only, the mapping moved with
 * mremap; the bytes below the old size are kept. GPU_NOMEM when growing
 * finds no memory (the arena is then unchanged). */
int gpu_host_arena_resize(gpu_arena *a, uint64_t bytes, mp_error *err);
/* MemAvailable of /proc/meminfo, and MemTotal, in bytes. */
int gpu_host_meminfo(uint64_t *total, uint64_t *avail, mp_error *err);
int gpu_host_staging_alloc(size_t bytes, void **out, mp_error *err);
void gpu_host_staging_free(void *p);
int gpu_host_cast(void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt, uint64_t n);
int gpu_host_dequant(void *dst, mp_dtype dst_dt, const void *src, int ggml_type, uint64_t n);

/* ---- CUDA discovery (gpu_cuda.c, only with MP_HAVE_CUDA) ---- */
#if MP_HAVE_CUDA
/* Number of CUDA devices; 0 when the driver is missing, too old or reports
 * none. When discovery itself failed, why (the CUDA error) goes to why
 * (why[0] stays '\0' otherwise). */
int gpu_cuda_count(char *why, size_t whysz);
bool gpu_cuda_versions_impl(int *runtime, int *driver);
#endif

#endif
