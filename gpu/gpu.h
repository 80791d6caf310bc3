/*
 * gpu.h - the one interface to the devices weights are placed on. Three
 * backends sit behind it (a table of functions each, gpu_internal.h): CUDA
 * (only in a build with MP_HAVE_CUDA, see gpu_cuda.c), "host" (gpu_host.c:
 * arenas are memfd-backed mappings, so a machine without a GPU, or a test,
 * can run every code path that places weights) and "async" (gpu_async.c: host
 * memory, but copies complete late on a worker thread per device and fences
 * signal only then, so tests catch what the host backend's done-on-return
 * copies hide). Nothing outside gpu/ includes a CUDA header.
 *
 * Model: a gpu_set is the list of devices the process was told to use
 * (--devices). Devices are addressed by their position in the set, 0..n-1
 * (as CUDA_VISIBLE_DEVICES renumbers); gpu_device_info.ordinal keeps the CUDA
 * ordinal. Weights live in arenas: one device allocation per arena, whose
 * sub-allocation (256-byte aligned offsets) is the caller's job. Every
 * operation on an arena takes (arena, byte offset) and is bounds-checked.
 *
 * Ordering: each device has one copy stream. gpu_copy_h2d, gpu_cast,
 * gpu_dequant and gpu_fill_dummy are queued on it in call order and may
 * return before they are done (on the host backend they are done on
 * return). A fence recorded after them completes when they have; the source
 * buffer of a copy must stay untouched until then. gpu_read and
 * gpu_device_sync wait for everything queued before.
 *
 * Thread safety: a set may be used from many threads. Calls on distinct
 * arenas are independent; calls that queue on the same device are ordered
 * in the order the stream receives them. Accounting is locked.
 *
 * Results: 0 on success; -1 with err set on failure; GPU_NOMEM (with err
 * code "insufficient_memory") when a device or host lacks the memory asked
 * for, so callers can tell "too big" from "broken".
 */
#ifndef MP_GPU_GPU_H
#define MP_GPU_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/tensor/tensor.h"
#include "util/error.h"

#define GPU_NOMEM (-2)
#define GPU_MAX_DEVICES 64
#define GPU_ARENA_ALIGN 256 /* offsets the caller hands out should be multiples of this */

typedef enum gpu_kind { GPU_KIND_HOST = 0, GPU_KIND_CUDA = 1, GPU_KIND_ASYNC = 2 } gpu_kind;

/* "host", "cuda", "async": the kind as /v1/devices and metrics show it. */
const char *gpu_kind_name(gpu_kind k);

typedef struct gpu_set gpu_set;
typedef struct gpu_arena gpu_arena;
typedef struct gpu_fence gpu_fence;

typedef struct gpu_device_info {
    int index; /* position in the set: what every call takes */
    gpu_kind kind;
    int ordinal;                 /* CUDA device ordinal; host: same as index */
    char name[256];              /* "NVIDIA H200", "host", "async" */
    uint64_t total_bytes;        /* cuda: cudaMemGetInfo; host: cap or MemTotal */
    uint64_t free_bytes;         /* cuda: cudaMemGetInfo; host: cap - resident or MemAvailable */
    uint64_t resident_bytes;     /* bytes of this set's live arenas on the device */
    char compute_capability[16]; /* "9.0"; "" for host (null in JSON) */
    char pci_bus_id[32];         /* "0000:19:00.0"; "" for host (null in JSON) */
} gpu_device_info;

/* ---- the device set ---- */

/* Opens the devices named by spec:
 *   NULL, "" or "auto"  CUDA devices if any (a missing driver counts as
 *                       none), else one host device
 *   "host"              one host device
 *   "host:N"            N host devices (1..64), for tensor-parallel tests
 *   "async", "async:N"  N (default 1) async test devices: host memory whose
 *                       copies, casts, dequantizations and fills run late, in
 *                       order, on one worker thread per device; a fence
 *                       signals only once the work before it is done; a copy
 *                       whose source changes while it is pending fails the
 *                       device (sticky error "staging_reused") and poisons
 *                       its destination with 0xA5. Arenas are not
 *                       CPU-addressable (gpu_arena_host_ptr is NULL).
 *   "0,1"               these CUDA ordinals; error "device_unavailable" if
 *                       one is absent or the build has no CUDA
 * A host or async spec may end in "@SIZE" (bytes, or with K/M/G/T suffix,
 * powers of 1024): a per-device memory cap, e.g. "host:2@64M".
 * host_cap_bytes, when nonzero, sets the same cap (the spec's wins). Caps
 * make out-of-memory reproducible without a GPU. An async spec may then end
 * in "/US": each queued operation is held back a random 0..US microseconds
 * (default 200; "/0" none), e.g. "async:2@64M/1000". Errors name field
 * "devices". */
int gpu_set_open(const char *spec, uint64_t host_cap_bytes, gpu_set **out, mp_error *err);
/* Host devices: whether arenas must be exportable (the default). An
 * exportable host arena is a fallocate'd memfd that gpu_arena_export hands
 * out. A private one (exportable = false) is an anonymous mapping backed by
 * transparent huge pages where the kernel allows: filling it costs a 2 MiB
 * page fault instead of a shmem fault per 4 KiB page, which makes a warm
 * load about twice as fast (except in a VM whose balloon hands free memory
 * back to the hypervisor: there the first touch of a huge page can cost
 * more), but gpu_arena_export fails on it with "not_exportable". Its free
 * memory is checked (MemAvailable, the cap) at allocation as for a memfd,
 * but pages are committed by the first write, so without a cap a write can
 * still meet an out-of-memory kill if memory vanished in between.
 * Affects arenas allocated afterwards; call before sharing the set. The
 * server keeps arenas exportable when it has an --export-socket. */
void gpu_set_host_exportable(gpu_set *s, bool exportable);
/* Host memory devices (host, async): keep freed memfd arenas, up to
 * cap_bytes of them across the set, for the next gpu_arena_alloc on the
 * same device, instead of unmapping them. A load then finds its memory
 * committed and mapped (no shmem zero-fill, no page faults, no teardown at
 * free), which is most of a host warm_load's cost. A pooled arena is
 * resized in place to the size asked (only the difference is committed or
 * released). Pooled memory counts as free (gpu_device_info free_bytes) and
 * is released when an allocation needs the room (a device cap, or
 * MemAvailable without one), when freeing would leave less than 1/8 of
 * MemTotal available, and at gpu_set_close. An arena whose handle went out
 * (gpu_arena_export) is never pooled: an importer may still map it. 0 (the
 * default) keeps no pool; CUDA sets ignore it. */
void gpu_set_arena_pool(gpu_set *s, uint64_t cap_bytes);
/* Bytes of arenas the pool holds now. */
uint64_t gpu_set_pooled_bytes(gpu_set *s);
/* The most staging memory (gpu_staging_alloc) the set hands out at once,
 * freed buffers kept for reuse included; 0 (default): no cap. On CUDA it
 * is pinned memory the OS cannot page out, hence the cap. */
void gpu_set_staging_cap(gpu_set *s, uint64_t cap_bytes);
uint64_t gpu_set_staging_cap_get(const gpu_set *s);
/* Frees the set. All its arenas and fences must have been freed first. */
void gpu_set_close(gpu_set *s);
int gpu_set_count(const gpu_set *s);
gpu_kind gpu_set_kind(const gpu_set *s); /* all devices of a set are one kind */
/* Why CUDA discovery found no device ("auto" or CUDA ordinals in a CUDA
 * build): the CUDA error, e.g. a driver too old for the runtime; "" when
 * discovery did not fail (or the build has no CUDA). */
const char *gpu_set_cuda_error(
    const gpu_set *s); /* Current info of device `index` (memory figures are queried now). */
int gpu_device_info_get(gpu_set *s, int index, gpu_device_info *out, mp_error *err);
/* Resident bytes of device index as accounted by the set (cheap, no query). */
uint64_t gpu_device_resident(gpu_set *s, int index);
/* Waits until everything queued on device index's copy stream is done. */
int gpu_device_sync(gpu_set *s, int index, mp_error *err);

/* CUDA runtime and driver versions as 1000*major + 10*minor (13000 = 13.0).
 * Returns false (and zeros) when the build has no CUDA; with CUDA but no
 * driver, returns true with *driver = 0. Either pointer may be NULL. */
bool gpu_cuda_versions(int *runtime, int *driver);

/* ---- arenas (device memory) ---- */

/* Allocates `bytes` (> 0) on device index. Checks free memory first (and
 * the host cap) and returns GPU_NOMEM when it cannot fit; memory is
 * committed on return (host: fallocate'd), so later writes cannot fault;
 * a private host arena (gpu_set_host_exportable) is committed by first write.
 * Contents are unspecified. */
int gpu_arena_alloc(gpu_set *s, int index, uint64_t bytes, gpu_arena **out, mp_error *err);
/* Waits for the device's queued work, then frees (or pools it, see
 * gpu_set_arena_pool). NULL is a no-op. */
void gpu_arena_free(gpu_arena *a);
/* Whether the arena came from the pool: it holds an earlier load's bytes
 * (a fresh host arena is zeros; contents are unspecified either way), so a
 * loader that does not write every byte clears the rest (gpu_memset). */
bool gpu_arena_reused(const gpu_arena *a);
/* Host backend only: the arena's memfd, for writing into it inside the
 * kernel (splice); -1 elsewhere. Not an export: the arena stays poolable. */
int gpu_arena_host_fd(const gpu_arena *a);
uint64_t gpu_arena_size(const gpu_arena *a);
int gpu_arena_device(const gpu_arena *a);
/* Host backend only: the arena's mapping (CPU-addressable); NULL on CUDA
 * and async. */
void *gpu_arena_host_ptr(const gpu_arena *a);

/* A handle another process can map the arena with. */
typedef struct gpu_export {
    gpu_kind kind; /* how to map it: GPU_KIND_HOST (a memfd: host and
                      async arenas) or GPU_KIND_CUDA (an IPC handle) */
    uint64_t size;
    int fd;               /* host: the arena's memfd (still owned by the arena;
                             dup() it or pass it over SCM_RIGHTS); -1 on cuda */
    char ipc_handle[132]; /* cuda: cudaIpcMemHandle_t as 128 lowercase hex
                             digits (offsets are from the arena start); "" on host */
    bool borrowed;        /* the handle does not keep the memory alive: once
                             the arena is freed an importer's mapping is
                             invalid (CUDA IPC; async arenas claim the same
                             so that tests see the rule). A memfd is not:
                             the kernel frees it after the last mapping. */
} gpu_export;
int gpu_arena_export(gpu_arena *a, gpu_export *out, mp_error *err);

/* ---- staging (pinned host memory) ---- */

/* Page-locked host memory (cuda: cudaHostAlloc portable; host backend:
 * 4096-aligned plain memory) to copy from at full speed. GPU_NOMEM when
 * the allocation fails; error code "staging_cap" (also GPU_NOMEM) when it
 * would take the set's staging over its cap (gpu_set_staging_cap). Freed
 * buffers are kept (up to the cap) and handed out again, so pinning (slow
 * on CUDA) happens once per set, not once per load; contents are
 * unspecified. */
int gpu_staging_alloc(gpu_set *s, size_t bytes, void **out, mp_error *err);
void gpu_staging_free(gpu_set *s, void *p);

/* ---- transfers ---- */

/* Queues a copy of n bytes from host memory src to arena a at offset off.
 * src should be staging memory (pageable memory works, without overlap);
 * it must not be reused before a fence recorded after this completes. */
int gpu_copy_h2d(gpu_arena *a, uint64_t off, const void *src, size_t n, mp_error *err);
/* Copies n bytes at offset off of arena a into dst, after all queued work
 * on the device; synchronous. For digests and tests, not for speed. */
int gpu_read(gpu_arena *a, uint64_t off, void *dst, size_t n, mp_error *err);

/* Fences mark a point in a device's copy stream (cuda: an event). Create
 * once, record after a batch of queued work, wait or poll before reusing
 * that batch's source buffers. */
int gpu_fence_create(gpu_set *s, int index, gpu_fence **out, mp_error *err);
int gpu_fence_record(gpu_fence *f, mp_error *err);
int gpu_fence_wait(gpu_fence *f, mp_error *err);
/* 1 when reached (or never recorded), 0 when pending, -1 on error. */
int gpu_fence_query(gpu_fence *f, mp_error *err);
void gpu_fence_free(gpu_fence *f);

/* ---- compute on the device (queued on the copy stream) ---- */

/* Whether gpu_cast converts from -> to: among F32/F16/BF16 (identity is a
 * copy) and from F8_E4M3 / F8_E5M2 to F32/F16/BF16. */
bool gpu_cast_supported(mp_dtype from, mp_dtype to);
/* Converts n elements of dtype src_dt at (src, src_off) into dst_dt at
 * (dst, dst_off), rounding to nearest even, NaN stays NaN (quiet, sign and
 * top payload bits kept), Inf stays Inf. Both arenas on one device. The
 * ranges may not overlap, except exactly (same offset) when both element
 * sizes are equal (an in-place cast). */
int gpu_cast(gpu_arena *dst, uint64_t dst_off, mp_dtype dst_dt, const gpu_arena *src,
             uint64_t src_off, mp_dtype src_dt, uint64_t n, mp_error *err);

/* Whether gpu_dequant handles this ggml type: every block type of
 * util/tensor/ggml_blocks.h (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K Q8_K IQ4_NL
 * IQ4_XS TQ1_0 TQ2_0 MXFP4 NVFP4; ggml's ids). F32/F16/BF16 sources are
 * gpu_cast's job. */
bool gpu_dequant_supported(int ggml_type);
/* Dequantizes n elements (a multiple of the type's block size) of ggml
 * blocks at (src, src_off) into dst_dt (F32, F16 or BF16) at (dst,
 * dst_off), computing in f32 exactly as ggml's dequantize_row_* without FMA
 * contraction, then rounding to nearest even. Ranges may not overlap. */
int gpu_dequant(gpu_arena *dst, uint64_t dst_off, mp_dtype dst_dt, const gpu_arena *src,
                uint64_t src_off, int ggml_type, uint64_t n, mp_error *err);

/* Parameters of a dummy fill (see gpu/dummy.h for the exact generator). */
typedef struct gpu_dummy_params {
    uint64_t seed;
    float low, high; /* values are in [low, high] */
    uint64_t first;  /* element index of the first element written */
} gpu_dummy_params;
/* Fills n elements of dt (F32, F16 or BF16) at (a, off) with the dummy
 * values of tensor `name`: element k gets value number first + k. The bytes
 * are identical on both backends and to gpu_dummy_fill_cpu. */
int gpu_fill_dummy(gpu_arena *a, uint64_t off, mp_dtype dt, uint64_t n, const char *name,
                   const gpu_dummy_params *p, mp_error *err);

/* Sets n bytes at (a, off) to byte, queued on the copy stream (cuda:
 * cudaMemsetAsync). */
int gpu_memset(gpu_arena *a, uint64_t off, int byte, uint64_t n, mp_error *err);

/* ---- tests ---- */

/* Async devices only: while held, device index's worker starts no queued
 * operation, so a test can see a fence pending and a copy not yet done.
 * Releasing lets the queue drain. -1 with err on other kinds. */
int gpu_async_hold(gpu_set *s, int index, bool hold, mp_error *err);

#endif
