/*
 * gpu_host.c - the host backend: "device memory" is host memory, so that a
 * machine without a GPU (and every test) can place, verify and export
 * weights through the same interface as CUDA.
 *
 * Arenas are memfd-backed shared mappings rather than malloc so that they
 * can be handed to another process by fd (the host analogue of a CUDA IPC
 * handle), and they are fallocate'd so that running out of memory is an
 * allocation error instead of a SIGBUS on first write. A set that never
 * exports (gpu_set_host_exportable) gets private anonymous arenas on
 * transparent huge pages instead, which fill much faster. Staging memory is
 * plain aligned memory and a copy is a memcpy that is done on return, so
 * streams and fences are no-ops here (the async backend, gpu_async.c, reuses
 * this file's memory functions with late copies and real fences).
 */
#include "gpu/gpu_internal.h"
#include "gpu/dummy.h"
#include "util/tensor/cast.h"
#include "util/tensor/ggml_blocks.h"
#include "util/tensor/scalar.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* MemTotal and MemAvailable from /proc/meminfo, in bytes. */
static int read_meminfo(uint64_t *total, uint64_t *avail, mp_error *err) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return mp_err(err, "io_error", "open /proc/meminfo: %s", strerror(errno));
    char line[256];
    int got = 0;
    *total = *avail = 0;
    while (fgets(line, sizeof line, f) && got != 3) {
        unsigned long long kb;
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1) {
            *total = (uint64_t)kb * 1024;
            got |= 1;
        } else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
            *avail = (uint64_t)kb * 1024;
            got |= 2;
        }
    }
    fclose(f);
    if (got != 3) return mp_err(err, "io_error", "/proc/meminfo lacks MemTotal/MemAvailable");
    return 0;
}

int gpu_host_meminfo(uint64_t *total, uint64_t *avail, mp_error *err) {
    return read_meminfo(total, avail, err);
}

int gpu_host_mem_info(const gpu_dev *d, uint64_t *total, uint64_t *avail, mp_error *err) {
    if (d->cap) {
        *total = d->cap;
        *avail = d->cap > d->resident ? d->cap - d->resident : 0;
        return 0;
    }
    return read_meminfo(total, avail, err);
}

#define HUGE_ALIGN ((size_t)2 << 20)

/* A private arena: anonymous memory, 2 MiB aligned and advised for
 * transparent huge pages, so that the loader's writes fault in 2 MiB at a
 * time (shmem gets no THP with the usual shmem_enabled=never, and its 4 KiB
 * faults cost more than the copy). No MAP_NORESERVE: under strict
 * overcommit the mmap itself fails cleanly. */
static int private_alloc(gpu_arena *a, mp_error *err) {
    size_t size = (size_t)a->size, len;
    if (__builtin_add_overflow(size, HUGE_ALIGN, &len))
        return gpu_nomem(err, "arena of %" PRIu64 " bytes", a->size);
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        if (e == ENOMEM) return gpu_nomem(err, "mmap arena: %s", strerror(e));
        return mp_err(err, "io_error", "mmap arena: %s", strerror(e));
    }
    /* Trim to an aligned start; munmap(ptr, size) then frees the rest. */
    unsigned char *start = (unsigned char *)(((uintptr_t)p + HUGE_ALIGN - 1) & ~(HUGE_ALIGN - 1));
    size_t head = (size_t)(start - p), keep = (size + 4095) & ~(size_t)4095;
    if (head) munmap(p, head);
    if (len - head > keep) munmap(start + keep, len - head - keep);
    /* Advice only: without THP the arena works with 4 KiB pages. */
    (void)madvise(start, size, MADV_HUGEPAGE);
    a->ptr = start;
    a->fd = -1;
    return 0;
}

int gpu_host_arena_alloc(gpu_arena *a, bool priv, mp_error *err) {
    if (a->size > (uint64_t)SIZE_MAX - HUGE_ALIGN || a->size > (uint64_t)INT64_MAX)
        return gpu_nomem(err, "arena of %" PRIu64 " bytes", a->size);
    if (priv) return private_alloc(a, err);
    int fd = memfd_create("modelprep-arena", MFD_CLOEXEC);
    if (fd < 0) return mp_err(err, "io_error", "memfd_create: %s", strerror(errno));
    if (ftruncate(fd, (off_t)a->size) != 0) {
        int e = errno;
        close(fd);
        return mp_err(err, "io_error", "ftruncate memfd: %s", strerror(e));
    }
    /* Commit the pages now: a shared mapping of a sparse memfd would fault
     * with SIGBUS on the first write that finds no memory. */
    int rc = fallocate(fd, 0, 0, (off_t)a->size);
    if (rc != 0) {
        int e = errno;
        close(fd);
        if (e == ENOSPC || e == ENOMEM || e == EFBIG)
            return gpu_nomem(err, "arena of %" PRIu64 " bytes: %s", a->size, strerror(e));
        return mp_err(err, "io_error", "fallocate memfd: %s", strerror(e));
    }
    void *p = mmap(NULL, (size_t)a->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        if (e == ENOMEM) return gpu_nomem(err, "mmap arena: %s", strerror(e));
        return mp_err(err, "io_error", "mmap arena: %s", strerror(e));
    }
    a->ptr = p;
    a->fd = fd;
    return 0;
}

int gpu_host_arena_resize(gpu_arena *a, uint64_t bytes, mp_error *err) {
    if (a->fd < 0) return mp_err(err, "internal", "only a memfd arena can be resized");
    if (bytes == a->size) return 0;
    if (bytes == 0 || bytes > (uint64_t)SIZE_MAX - HUGE_ALIGN || bytes > (uint64_t)INT64_MAX)
        return gpu_nomem(err, "arena of %" PRIu64 " bytes", bytes);
    bool grow = bytes > a->size;
    if (grow) {
        /* Only the new tail is committed (and zeroed by the kernel). */
        if (ftruncate(a->fd, (off_t)bytes) != 0)
            return mp_err(err, "io_error", "ftruncate memfd: %s", strerror(errno));
        if (fallocate(a->fd, 0, (off_t)a->size, (off_t)(bytes - a->size)) != 0) {
            int e = errno;
            (void)ftruncate(a->fd, (off_t)a->size);
            if (e == ENOSPC || e == ENOMEM || e == EFBIG)
                return gpu_nomem(err, "arena of %" PRIu64 " bytes: %s", bytes, strerror(e));
            return mp_err(err, "io_error", "fallocate memfd: %s", strerror(e));
        }
    }
    void *p = mremap(a->ptr, (size_t)a->size, (size_t)bytes, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) {
        int e = errno;
        if (grow) (void)ftruncate(a->fd, (off_t)a->size);
        if (e == ENOMEM) return gpu_nomem(err, "mremap arena: %s", strerror(e));
        return mp_err(err, "io_error", "mremap arena: %s", strerror(e));
    }
    /* Shrinking: the mapping no longer covers the tail, so dropping the
     * tail's pages cannot fault anyone. */
    if (!grow && ftruncate(a->fd, (off_t)bytes) != 0) {
        int e = errno;
        a->ptr = p;
        a->size = bytes; /* the mapping is already the new size */
        return mp_err(err, "io_error", "ftruncate memfd: %s", strerror(e));
    }
    a->ptr = p;
    a->size = bytes;
    return 0;
}

void gpu_host_arena_free(gpu_arena *a) {
    if (a->ptr) munmap(a->ptr, (size_t)a->size);
    if (a->fd >= 0) close(a->fd);
    a->ptr = NULL;
    a->fd = -1;
}

int gpu_host_staging_alloc(size_t bytes, void **out, mp_error *err) {
    size_t rounded;
    if (bytes == 0 || __builtin_add_overflow(bytes, (size_t)4095, &rounded))
        return mp_err(err, "invalid_argument", "staging size %zu", bytes);
    rounded &= ~(size_t)4095;
    void *p = aligned_alloc(4096, rounded);
    if (!p) return gpu_nomem(err, "staging buffer of %zu bytes", bytes);
    *out = p;
    return 0;
}

void gpu_host_staging_free(void *p) {
    free(p);
}

static void store_elem(unsigned char *dst, mp_dtype dt, uint64_t i, float v) {
    uint16_t h;
    uint32_t u;
    switch (dt) {
    case MP_DT_F32:
        u = scalar_f32_bits(v);
        memcpy(dst + 4 * i, &u, 4);
        break;
    case MP_DT_F16:
        h = scalar_f32_to_f16(v);
        memcpy(dst + 2 * i, &h, 2);
        break;
    case MP_DT_BF16:
        h = scalar_f32_to_bf16(v);
        memcpy(dst + 2 * i, &h, 2);
        break;
    default:
        break;
    }
}

/* The CPU's one cast (util/tensor/cast.c): the same scalar conversions as
 * kernels.cu, so host and CUDA arenas hold the same bits. gpu.c has
 * checked the pair, and in place only with equal element sizes. */
int gpu_host_cast(void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt, uint64_t n) {
    return tensor_cast(src_dt, src, dst_dt, dst, (size_t)n) ? 0 : -1;
}

/* Element by element through ggml_blk_value, as the CUDA kernel goes, so
 * that test_gpu_host, comparing this with gguf_dequant (ggml_blk_decode),
 * also checks the device's entry point. */
int gpu_host_dequant(void *dst, mp_dtype dst_dt, const void *src, int ggml_type, uint64_t n) {
    unsigned be = ggml_blk_elems(ggml_type), bb = ggml_blk_bytes(ggml_type);
    if (!be) return -1;
    unsigned char *d = dst;
    const unsigned char *s = src;
    for (uint64_t b = 0; b < n / be; b++) {
        const uint8_t *blk = s + b * bb;
        for (unsigned j = 0; j < be; j++)
            store_elem(d, dst_dt, b * be + j, ggml_blk_value(ggml_type, blk, j));
    }
    return 0;
}

/* ---- the backend table ---- */

/* Everything below is done on return: the stream, fences and syncs have
 * nothing to wait for. */

static int host_describe(const gpu_dev *d, gpu_device_info *info, mp_error *err) {
    (void)d, (void)err;
    snprintf(info->name, sizeof info->name, "host");
    return 0;
}

static int host_arena_alloc(gpu_arena *a, mp_error *err) {
    return gpu_host_arena_alloc(a, a->priv, err);
}

static int host_arena_export(gpu_arena *a, gpu_export *out, mp_error *err) {
    out->kind = GPU_KIND_HOST;
    if (a->fd < 0)
        return mp_err(err, "not_exportable",
                      "host arena is private (the set was opened without export)");
    out->fd = a->fd;
    return 0;
}

static int host_staging_alloc(gpu_set *s, size_t bytes, void **out, mp_error *err) {
    (void)s;
    return gpu_host_staging_alloc(bytes, out, err);
}

static void host_staging_free(gpu_set *s, void *p) {
    (void)s;
    gpu_host_staging_free(p);
}

static int host_stream_init(gpu_dev *d, mp_error *err) {
    (void)d, (void)err;
    return 0;
}

static void host_stream_destroy(gpu_dev *d) {
    (void)d;
}

static int host_copy_h2d(gpu_dev *d, void *dst, const void *src, size_t n, mp_error *err) {
    (void)d, (void)err;
    memcpy(dst, src, n);
    return 0;
}

static int host_read(gpu_dev *d, const void *src, void *dst, size_t n, mp_error *err) {
    (void)d, (void)err;
    memcpy(dst, src, n);
    return 0;
}

static int host_done(gpu_dev *d, mp_error *err) {
    (void)d, (void)err;
    return 0;
}

static int host_fence_op(gpu_dev *d, gpu_fence *f, mp_error *err) {
    (void)d, (void)f, (void)err;
    return 0;
}

static int host_fence_query(gpu_dev *d, gpu_fence *f, mp_error *err) {
    (void)d, (void)f, (void)err;
    return 1;
}

static void host_fence_free(gpu_dev *d, gpu_fence *f) {
    (void)d, (void)f;
}

static int host_cast_op(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt,
                        uint64_t n, mp_error *err) {
    (void)d;
    if (gpu_host_cast(dst, dst_dt, src, src_dt, n) != 0)
        return mp_err(err, "unsupported_dtype", "no host cast from %s to %s", mp_dtype_name(src_dt),
                      mp_dtype_name(dst_dt));
    return 0;
}

static int host_dequant_op(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, int ggml_type,
                           uint64_t n, mp_error *err) {
    (void)d;
    if (gpu_host_dequant(dst, dst_dt, src, ggml_type, n) != 0)
        return mp_err(err, "unsupported_dtype", "no host dequantization of ggml type %d",
                      ggml_type);
    return 0;
}

static int host_fill_dummy(gpu_dev *d, void *dst, mp_dtype dt, uint64_t n, uint64_t first,
                           uint64_t tseed, float low, float high, mp_error *err) {
    (void)d;
    if (gpu_dummy_fill_cpu(dst, dt, n, first, tseed, low, high) != 0)
        return mp_err(err, "unsupported_dtype", "dummy weights of dtype %s", mp_dtype_name(dt));
    return 0;
}

static int host_memset(gpu_dev *d, void *dst, int byte, uint64_t n, mp_error *err) {
    (void)d, (void)err;
    memset(dst, byte, (size_t)n);
    return 0;
}

const gpu_backend gpu_backend_host = {
    .name = "host",
    .kind = GPU_KIND_HOST,
    .host_memory = true,
    .cpu_addressable = true,
    .describe = host_describe,
    .mem_info = gpu_host_mem_info,
    .arena_alloc = host_arena_alloc,
    .arena_free = gpu_host_arena_free,
    .arena_export = host_arena_export,
    .staging_alloc = host_staging_alloc,
    .staging_free = host_staging_free,
    .stream_init = host_stream_init,
    .stream_destroy = host_stream_destroy,
    .copy_h2d = host_copy_h2d,
    .read = host_read,
    .sync = host_done,
    .fence_create = host_fence_op,
    .fence_record = host_fence_op,
    .fence_wait = host_fence_op,
    .fence_query = host_fence_query,
    .fence_free = host_fence_free,
    .cast = host_cast_op,
    .dequant = host_dequant_op,
    .fill_dummy = host_fill_dummy,
    .memset = host_memset,
};
