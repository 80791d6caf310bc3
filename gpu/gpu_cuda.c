/*
 * gpu_cuda.c - the CUDA backend, through the CUDA runtime API. Compiled to
 * nothing unless MP_HAVE_CUDA (make cuda), so that the normal build needs no
 * CUDA at all.
 *
 * The runtime's current device is per thread and any thread may call us,
 * so every entry point sets the device first. A missing or broken driver
 * shows up as zero devices in discovery, never as an error there: "auto"
 * then falls back to the host backend, and the CUDA error is kept
 * (gpu_set_cuda_error) for /v1/devices and the log, so that a driver too old
 * for the runtime is not mistaken for a machine without a GPU.
 *
 * Untested on hardware as of this writing: it compiles and links (make cuda)
 * and tests/cuda/ runs where a GPU is lent.
 */
#if MP_HAVE_CUDA

#include "gpu/gpu_internal.h"
#include "gpu/kernels.h"

#include <cuda_runtime_api.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static int cuda_fail(mp_error *err, cudaError_t e, const char *what) {
    /* A failed call also leaves its error as the thread's last error, which
     * the next cudaGetLastError (the check after a kernel launch) would
     * report as the launch's own: clear it. Sticky errors (a broken context)
     * stay whatever we do and keep failing every later call. */
    (void)cudaGetLastError();
    if (e == cudaErrorMemoryAllocation)
        return gpu_nomem(err, "%s: %s", what, cudaGetErrorString(e));
    return mp_err(err, "cuda_error", "%s: %s (%d)", what, cudaGetErrorString(e), (int)e);
}

#define CU_TRY(call, what)                                                                         \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return cuda_fail(err, e_, what);                                    \
    } while (0)

int gpu_cuda_count(char *why, size_t whysz) {
    int n = 0;
    if (whysz) why[0] = '\0';
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        /* cudaErrorNoDevice is a machine without a GPU, not a fault; any
         * other error (no driver, a driver older than the runtime, a broken
         * install) is why a GPU machine found nothing. */
        if (e != cudaErrorNoDevice && whysz)
            snprintf(why, whysz, "%s (%s, %d)", cudaGetErrorString(e), cudaGetErrorName(e), (int)e);
        return 0;
    }
    return n < 0 ? 0 : n;
}

bool gpu_cuda_versions_impl(int *runtime, int *driver) {
    if (cudaRuntimeGetVersion(runtime) != cudaSuccess) *runtime = 0;
    if (cudaDriverGetVersion(driver) != cudaSuccess) *driver = 0;
    cudaGetLastError();
    return true;
}

static int cuda_describe(const gpu_dev *d, gpu_device_info *info, mp_error *err) {
    int ordinal = d->ordinal;
    struct cudaDeviceProp p;
    CU_TRY(cudaGetDeviceProperties(&p, ordinal), "cudaGetDeviceProperties");
    snprintf(info->name, sizeof info->name, "%.*s", (int)sizeof p.name, p.name);
    snprintf(info->compute_capability, sizeof info->compute_capability, "%d.%d", p.major, p.minor);
    char bus[sizeof info->pci_bus_id];
    if (cudaDeviceGetPCIBusId(bus, (int)sizeof bus, ordinal) == cudaSuccess)
        snprintf(info->pci_bus_id, sizeof info->pci_bus_id, "%s", bus);
    else
        cudaGetLastError();
    return 0;
}

static int cuda_mem_info(const gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err) {
    size_t f = 0, t = 0;
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
    *total = t;
    *avail = f;
    return 0;
}

static int cuda_arena_alloc(gpu_arena *a, mp_error *err) {
    gpu_dev *d = &a->set->dev[a->dev];
    uint64_t total, avail;
    if (cuda_mem_info(d, &total, &avail, err) != 0) return -1;
    if (a->size > avail)
        return gpu_nomem(err, "device %d (cuda %d): %" PRIu64 " bytes asked, %" PRIu64 " free",
                         a->dev, d->ordinal, a->size, avail);
    void *p = NULL;
    CU_TRY(cudaMalloc(&p, (size_t)a->size), "cudaMalloc");
    a->ptr = p;
    return 0;
}

static void cuda_arena_free(gpu_arena *a) {
    gpu_dev *d = &a->set->dev[a->dev];
    if (!a->ptr) return;
    if (cudaSetDevice(d->ordinal) == cudaSuccess) {
        /* Stream-ordered: the free happens after the copies queued on the
         * arena's stream, without cudaFree's wait for the whole device, so
         * an unload does not stall another load's stream on this GPU. Where
         * the driver refuses it (no stream, or a driver without the
         * stream-ordered allocator) wait for the stream, then cudaFree.
         * Untested on hardware (no GPU where this was written). */
        bool freed = d->stream && cudaFreeAsync(a->ptr, (cudaStream_t)d->stream) == cudaSuccess;
        if (!freed) {
            (void)cudaGetLastError();
            if (d->stream) cudaStreamSynchronize((cudaStream_t)d->stream);
            cudaFree(a->ptr);
        }
    }
    cudaGetLastError();
    a->ptr = NULL;
}

static int cuda_arena_export(gpu_arena *a, gpu_export *out, mp_error *err) {
    cudaIpcMemHandle_t h;
    char *hex = out->ipc_handle;
    out->kind = GPU_KIND_CUDA;
    /* The importer's mapping dies with our cudaFree. */
    out->borrowed = true;
    if (sizeof out->ipc_handle < 2 * sizeof h.reserved + 1)
        return mp_err(err, "internal", "IPC handle buffer too small");
    CU_TRY(cudaSetDevice(a->set->dev[a->dev].ordinal), "cudaSetDevice");
    CU_TRY(cudaIpcGetMemHandle(&h, a->ptr), "cudaIpcGetMemHandle");
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof h.reserved; i++) {
        unsigned char c = (unsigned char)h.reserved[i];
        hex[2 * i] = digits[c >> 4];
        hex[2 * i + 1] = digits[c & 15];
    }
    hex[2 * sizeof h.reserved] = '\0';
    return 0;
}

static int cuda_staging_alloc(gpu_set *s, size_t bytes, void **out, mp_error *err) {
    (void)s;
    void *p = NULL;
    CU_TRY(cudaHostAlloc(&p, bytes, cudaHostAllocPortable), "cudaHostAlloc");
    *out = p;
    return 0;
}

static void cuda_staging_free(gpu_set *s, void *p) {
    (void)s;
    cudaFreeHost(p);
    cudaGetLastError();
}

static int cuda_stream_init(gpu_dev *d, mp_error *err) {
    cudaStream_t s;
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    d->stream = s;
    return 0;
}

static void cuda_stream_destroy(gpu_dev *d) {
    if (!d->stream) return;
    if (cudaSetDevice(d->ordinal) == cudaSuccess) {
        cudaStreamSynchronize((cudaStream_t)d->stream);
        cudaStreamDestroy((cudaStream_t)d->stream);
    }
    cudaGetLastError();
    d->stream = NULL;
}

static int cuda_copy_h2d(gpu_dev *d, void *dst, const void *src, size_t n, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, (cudaStream_t)d->stream),
           "cudaMemcpyAsync H2D");
    return 0;
}

static int cuda_read(gpu_dev *d, const void *src, void *dst, size_t n, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, (cudaStream_t)d->stream),
           "cudaMemcpyAsync D2H");
    CU_TRY(cudaStreamSynchronize((cudaStream_t)d->stream), "cudaStreamSynchronize");
    return 0;
}

static int cuda_sync(gpu_dev *d, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaStreamSynchronize((cudaStream_t)d->stream), "cudaStreamSynchronize");
    return 0;
}

static int cuda_fence_create(gpu_dev *d, gpu_fence *f, mp_error *err) {
    cudaEvent_t e;
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    /* Blocking sync: a waiting loader thread sleeps instead of spinning on a
     * core the file readers need. */
    CU_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync),
           "cudaEventCreate");
    f->event = e;
    return 0;
}

static int cuda_fence_record(gpu_dev *d, gpu_fence *f, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaEventRecord((cudaEvent_t)f->event, (cudaStream_t)d->stream), "cudaEventRecord");
    return 0;
}

static int cuda_fence_wait(gpu_dev *d, gpu_fence *f, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaEventSynchronize((cudaEvent_t)f->event), "cudaEventSynchronize");
    return 0;
}

static int cuda_fence_query(gpu_dev *d, gpu_fence *f, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    cudaError_t e = cudaEventQuery((cudaEvent_t)f->event);
    if (e == cudaSuccess) return 1;
    if (e == cudaErrorNotReady) {
        cudaGetLastError();
        return 0;
    }
    return cuda_fail(err, e, "cudaEventQuery");
}

static void cuda_fence_free(gpu_dev *d, gpu_fence *f) {
    if (!f->event) return;
    if (cudaSetDevice(d->ordinal) == cudaSuccess) cudaEventDestroy((cudaEvent_t)f->event);
    cudaGetLastError();
    f->event = NULL;
}

static int cuda_cast(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt,
                     uint64_t n, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY((cudaError_t)gpuk_cast(dst, (int)dst_dt, src, (int)src_dt, n, d->stream),
           "cast kernel launch");
    return 0;
}

static int cuda_dequant(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, int ggml_type,
                        uint64_t n, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY((cudaError_t)gpuk_dequant(dst, (int)dst_dt, src, ggml_type, n, d->stream),
           "dequant kernel launch");
    return 0;
}

static int cuda_fill_dummy(gpu_dev *d, void *dst, mp_dtype dt, uint64_t n, uint64_t first,
                           uint64_t tseed, float low, float high, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY((cudaError_t)gpuk_fill_dummy(dst, (int)dt, n, first, tseed, low, high, d->stream),
           "dummy kernel launch");
    return 0;
}

static int cuda_memset(gpu_dev *d, void *dst, int byte, uint64_t n, mp_error *err) {
    CU_TRY(cudaSetDevice(d->ordinal), "cudaSetDevice");
    CU_TRY(cudaMemsetAsync(dst, byte, (size_t)n, (cudaStream_t)d->stream), "cudaMemsetAsync");
    return 0;
}

const gpu_backend gpu_backend_cuda = {
    .name = "cuda",
    .kind = GPU_KIND_CUDA,
    .host_memory = false,
    .cpu_addressable = false,
    .describe = cuda_describe,
    .mem_info = cuda_mem_info,
    .arena_alloc = cuda_arena_alloc,
    .arena_free = cuda_arena_free,
    .arena_export = cuda_arena_export,
    .staging_alloc = cuda_staging_alloc,
    .staging_free = cuda_staging_free,
    .stream_init = cuda_stream_init,
    .stream_destroy = cuda_stream_destroy,
    .copy_h2d = cuda_copy_h2d,
    .read = cuda_read,
    .sync = cuda_sync,
    .fence_create = cuda_fence_create,
    .fence_record = cuda_fence_record,
    .fence_wait = cuda_fence_wait,
    .fence_query = cuda_fence_query,
    .fence_free = cuda_fence_free,
    .cast = cuda_cast,
    .dequant = cuda_dequant,
    .fill_dummy = cuda_fill_dummy,
    .memset = cuda_memset,
};

#else
/* ISO C forbids an empty translation unit. */
typedef int gpu_cuda_unused;
#endif
