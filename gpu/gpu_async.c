/*
 * gpu_async.c - the "async" test backend (--devices async:N[@SIZE][/US]):
 * device memory is host memory, as on the host backend (whose memory
 * functions it reuses), but it keeps the rules a GPU enforces and the host
 * backend cannot, so that a test on a machine without a GPU fails where a
 * GPU would corrupt weights:
 *
 *   - a copy, cast, dequantization, fill or memset is queued on the device's stream
 *     and done later, in call order, by one worker thread per device (each
 *     held back a random 0..US microseconds, so the caller really runs ahead);
 *   - a fence signals only once everything queued before its record is
 *     done: gpu_fence_query says 0 until then, gpu_fence_wait blocks;
 *   - a copy checksums its source when queued and its destination when done:
 *     if they differ, the source (a staging slot) was refilled while its copy
 *     was pending. The destination is then poisoned with 0xA5, the device
 *     fails (sticky error "staging_reused", every later call on the device
 *     reports it, as a broken CUDA context does) and a line goes to stderr;
 *   - arenas are not CPU-addressable (gpu_arena_host_ptr is NULL), so loads
 *     take the staging path a GPU takes; fresh staging memory is 0xA5, not
 *     zeros; freeing staging waits for pending copies (as cudaFreeHost does);
 *   - an exported arena is a memfd (the host mapping), but reported as
 *     borrowed, as a CUDA IPC handle is, so that unloading one is refused
 *     as it would be on a GPU.
 *
 * The worker threads belong to the set: created with a device's stream
 * (first use), drained and joined by gpu_set_close.
 */
#include "gpu/gpu_internal.h"
#include "gpu/dummy.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GPU_ASYNC_POISON 0xA5

typedef enum gpu_async_kind {
    GPU_ASYNC_COPY,
    GPU_ASYNC_CAST,
    GPU_ASYNC_DEQUANT,
    GPU_ASYNC_FILL,
    GPU_ASYNC_MEMSET,
} gpu_async_kind;

/* One queued operation: the arguments of the call, kept until it runs. */
typedef struct gpu_async_op {
    struct gpu_async_op *next;
    uint64_t seq; /* its position in the stream, from 1 */
    gpu_async_kind kind;
    void *dst;
    const void *src;
    uint64_t n;   /* copy: bytes; others: elements */
    uint64_t sum; /* copy: checksum of the source when queued */
    mp_dtype dst_dt, src_dt;
    int ggml_type;
    uint64_t first, tseed;
    float low, high;
    int byte; /* memset */
} gpu_async_op;

typedef struct gpu_async_stream {
    int index;
    unsigned delay_us;
    uint64_t rng; /* the worker's own: delays */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work; /* to the worker: queued, released or stopping */
    pthread_cond_t done; /* to waiters: completed moved */
    gpu_async_op *head, *tail;
    uint64_t submitted, completed; /* seqs; every op <= completed is done */
    bool hold, stop;
    bool failed; /* sticky, with err */
    mp_error err;
} gpu_async_stream;

static gpu_async_stream *stream_of(const gpu_dev *d) {
    return (gpu_async_stream *)d->stream;
}

/* Order-sensitive 64-bit checksum: any change of the bytes changes it but
 * for a 2^-64 chance. Not cryptographic; it only needs to catch a refill. */
static uint64_t gpu_async_sum(const void *p, uint64_t n) {
    const unsigned char *b = p;
    uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    for (; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t gpu_async_rand(gpu_async_stream *st) {
    uint64_t x = st->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return st->rng = x;
}

static void gpu_async_sleep_us(unsigned us) {
    struct timespec ts = {.tv_sec = us / 1000000u, .tv_nsec = (long)(us % 1000000u) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Runs one operation on the worker. 0, or -1 with e set. */
static int gpu_async_run(gpu_async_stream *st, const gpu_async_op *op, mp_error *e) {
    switch (op->kind) {
    case GPU_ASYNC_COPY:
        memcpy(op->dst, op->src, (size_t)op->n);
        if (gpu_async_sum(op->dst, op->n) != op->sum) {
            /* What a GPU would have copied is unknowable: make it visibly wrong. */
            memset(op->dst, GPU_ASYNC_POISON, (size_t)op->n);
            return mp_err(e, "staging_reused",
                          "async device %d: the source of a %" PRIu64
                          "-byte copy changed while the copy was pending (a staging buffer "
                          "refilled before its fence signalled)",
                          st->index, op->n);
        }
        return 0;
    case GPU_ASYNC_CAST:
        if (gpu_host_cast(op->dst, op->dst_dt, op->src, op->src_dt, op->n) != 0)
            return mp_err(e, "internal", "async device %d: cast failed", st->index);
        return 0;
    case GPU_ASYNC_DEQUANT:
        if (gpu_host_dequant(op->dst, op->dst_dt, op->src, op->ggml_type, op->n) != 0)
            return mp_err(e, "internal", "async device %d: dequantization failed", st->index);
        return 0;
    case GPU_ASYNC_FILL:
        if (gpu_dummy_fill_cpu(op->dst, op->dst_dt, op->n, op->first, op->tseed, op->low,
                               op->high) != 0)
            return mp_err(e, "internal", "async device %d: dummy fill failed", st->index);
        return 0;
    case GPU_ASYNC_MEMSET:
        memset(op->dst, op->byte, (size_t)op->n);
        return 0;
    }
    return mp_err(e, "internal", "async device %d: unknown operation", st->index);
}

static void *gpu_async_worker(void *arg) {
    gpu_async_stream *st = arg;
    pthread_mutex_lock(&st->mu);
    for (;;) {
        /* Stopping overrides a hold: the queue drains before the thread ends. */
        while (!st->stop && (!st->head || st->hold))
            pthread_cond_wait(&st->work, &st->mu);
        gpu_async_op *op = st->head;
        if (!op) break; /* stopping, and nothing left */
        st->head = op->next;
        if (!st->head) st->tail = NULL;
        bool skip = st->failed; /* a failed device does nothing more, as a dead context */
        unsigned delay = skip || !st->delay_us
                             ? 0
                             : (unsigned)(gpu_async_rand(st) % ((uint64_t)st->delay_us + 1));
        pthread_mutex_unlock(&st->mu);
        if (delay) gpu_async_sleep_us(delay);
        mp_error e = {0};
        int rc = skip ? 0 : gpu_async_run(st, op, &e);
        pthread_mutex_lock(&st->mu);
        if (rc != 0 && !st->failed) {
            st->failed = true;
            st->err = e;
            /* Loud: a test that only looks at digests still finds this in the log. */
            fprintf(stderr, "gpu async: %s: %s\n", e.code, e.message);
        }
        st->completed = op->seq;
        pthread_cond_broadcast(&st->done);
        free(op);
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* Copies the sticky error out; -1. Call under st->mu. */
static int gpu_async_failed(const gpu_async_stream *st, mp_error *err) {
    if (err) *err = st->err;
    return -1;
}

/* Waits until every operation up to seq is done. */
static int gpu_async_wait(gpu_async_stream *st, uint64_t seq, mp_error *err) {
    pthread_mutex_lock(&st->mu);
    while (st->completed < seq)
        pthread_cond_wait(&st->done, &st->mu);
    int rc = st->failed ? gpu_async_failed(st, err) : 0;
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int gpu_async_sync_stream(gpu_async_stream *st, mp_error *err) {
    pthread_mutex_lock(&st->mu);
    uint64_t target = st->submitted;
    pthread_mutex_unlock(&st->mu);
    return gpu_async_wait(st, target, err);
}

/* Queues op (owned from here on). */
static int gpu_async_enqueue(gpu_dev *d, gpu_async_op *op, mp_error *err) {
    gpu_async_stream *st = stream_of(d);
    pthread_mutex_lock(&st->mu);
    if (st->failed) {
        int rc = gpu_async_failed(st, err);
        pthread_mutex_unlock(&st->mu);
        free(op);
        return rc;
    }
    op->seq = ++st->submitted;
    if (st->tail)
        st->tail->next = op;
    else
        st->head = op;
    st->tail = op;
    pthread_cond_signal(&st->work);
    pthread_mutex_unlock(&st->mu);
    return 0;
}

static gpu_async_op *gpu_async_op_new(gpu_async_kind kind, void *dst, const void *src, uint64_t n,
                                      mp_error *err) {
    gpu_async_op *op = calloc(1, sizeof *op);
    if (!op) {
        mp_err(err, "out_of_memory", "async operation");
        return NULL;
    }
    op->kind = kind;
    op->dst = dst;
    op->src = src;
    op->n = n;
    return op;
}

/* ---- the backend table ---- */

static int async_describe(const gpu_dev *d, gpu_device_info *info, mp_error *err) {
    (void)d, (void)err;
    snprintf(info->name, sizeof info->name, "async");
    return 0;
}

static int async_arena_alloc(gpu_arena *a, mp_error *err) {
    return gpu_host_arena_alloc(a, a->priv, err);
}

static void async_arena_free(gpu_arena *a) {
    /* Queued work may still write the arena; its error (if any) is the
     * device's, reported to whoever syncs next. */
    gpu_dev *d = &a->set->dev[a->dev];
    if (d->stream) (void)gpu_async_sync_stream(stream_of(d), NULL);
    gpu_host_arena_free(a);
}

static int async_arena_export(gpu_arena *a, gpu_export *out, mp_error *err) {
    out->kind = GPU_KIND_HOST; /* mapped as a memfd */
    out->borrowed = true;      /* but kept by the rules of a CUDA IPC handle */
    if (a->fd < 0)
        return mp_err(err, "not_exportable",
                      "async arena is private (the set was opened without export)");
    out->fd = a->fd;
    return 0;
}

static int async_staging_alloc(gpu_set *s, size_t bytes, void **out, mp_error *err) {
    (void)s;
    int rc = gpu_host_staging_alloc(bytes, out, err);
    /* Never-written staging is visible in what arrives, not quietly zero. */
    if (rc == 0) memset(*out, GPU_ASYNC_POISON, bytes);
    return rc;
}

static void async_staging_free(gpu_set *s, void *p) {
    /* Any device may still be copying from p: wait for all (cudaFreeHost
     * synchronizes the same way). Streams live until the set closes, so the
     * pointers taken under the lock stay valid. */
    gpu_async_stream *streams[GPU_MAX_DEVICES];
    int n = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n; i++)
        if (s->dev[i].ready) streams[n++] = stream_of(&s->dev[i]);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n; i++)
        (void)gpu_async_sync_stream(streams[i], NULL);
    gpu_host_staging_free(p);
}

static int async_stream_init(gpu_dev *d, mp_error *err) {
    gpu_async_stream *st = calloc(1, sizeof *st);
    if (!st) return mp_err(err, "out_of_memory", "async stream");
    st->index = d->index;
    st->delay_us = d->delay_us;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* Varies per run and device; never 0 (xorshift's fixed point). */
    st->rng = ((uint64_t)now.tv_nsec * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)d->index + 1) ^
              ((uint64_t)now.tv_sec << 32);
    if (!st->rng) st->rng = 1;
    if (pthread_mutex_init(&st->mu, NULL) != 0) {
        free(st);
        return mp_err(err, "internal", "pthread_mutex_init");
    }
    if (pthread_cond_init(&st->work, NULL) != 0) {
        pthread_mutex_destroy(&st->mu);
        free(st);
        return mp_err(err, "internal", "pthread_cond_init");
    }
    if (pthread_cond_init(&st->done, NULL) != 0) {
        pthread_cond_destroy(&st->work);
        pthread_mutex_destroy(&st->mu);
        free(st);
        return mp_err(err, "internal", "pthread_cond_init");
    }
    if (pthread_create(&st->thread, NULL, gpu_async_worker, st) != 0) {
        pthread_cond_destroy(&st->done);
        pthread_cond_destroy(&st->work);
        pthread_mutex_destroy(&st->mu);
        free(st);
        return mp_err(err, "internal", "cannot start the async worker of device %d", d->index);
    }
    d->stream = st;
    return 0;
}

static void async_stream_destroy(gpu_dev *d) {
    gpu_async_stream *st = stream_of(d);
    if (!st) return;
    pthread_mutex_lock(&st->mu);
    st->stop = true;
    pthread_cond_signal(&st->work);
    pthread_mutex_unlock(&st->mu);
    pthread_join(st->thread, NULL);
    pthread_cond_destroy(&st->done);
    pthread_cond_destroy(&st->work);
    pthread_mutex_destroy(&st->mu);
    free(st);
    d->stream = NULL;
}

static int async_copy_h2d(gpu_dev *d, void *dst, const void *src, size_t n, mp_error *err) {
    gpu_async_op *op = gpu_async_op_new(GPU_ASYNC_COPY, dst, src, n, err);
    if (!op) return -1;
    op->sum = gpu_async_sum(src, n);
    return gpu_async_enqueue(d, op, err);
}

static int async_read(gpu_dev *d, const void *src, void *dst, size_t n, mp_error *err) {
    if (gpu_async_sync_stream(stream_of(d), err) != 0) return -1;
    memcpy(dst, src, n);
    return 0;
}

static int async_sync(gpu_dev *d, mp_error *err) {
    return gpu_async_sync_stream(stream_of(d), err);
}

static int async_fence_create(gpu_dev *d, gpu_fence *f, mp_error *err) {
    (void)d, (void)err;
    f->seq = 0;
    return 0;
}

static int async_fence_record(gpu_dev *d, gpu_fence *f, mp_error *err) {
    gpu_async_stream *st = stream_of(d);
    pthread_mutex_lock(&st->mu);
    int rc = st->failed ? gpu_async_failed(st, err) : 0;
    if (rc == 0) f->seq = st->submitted;
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int async_fence_wait(gpu_dev *d, gpu_fence *f, mp_error *err) {
    return gpu_async_wait(stream_of(d), f->seq, err);
}

static int async_fence_query(gpu_dev *d, gpu_fence *f, mp_error *err) {
    gpu_async_stream *st = stream_of(d);
    pthread_mutex_lock(&st->mu);
    int rc = st->failed ? gpu_async_failed(st, err) : st->completed >= f->seq;
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static void async_fence_free(gpu_dev *d, gpu_fence *f) {
    (void)d, (void)f;
}

static int async_cast(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, mp_dtype src_dt,
                      uint64_t n, mp_error *err) {
    gpu_async_op *op = gpu_async_op_new(GPU_ASYNC_CAST, dst, src, n, err);
    if (!op) return -1;
    op->dst_dt = dst_dt;
    op->src_dt = src_dt;
    return gpu_async_enqueue(d, op, err);
}

static int async_dequant(gpu_dev *d, void *dst, mp_dtype dst_dt, const void *src, int ggml_type,
                         uint64_t n, mp_error *err) {
    gpu_async_op *op = gpu_async_op_new(GPU_ASYNC_DEQUANT, dst, src, n, err);
    if (!op) return -1;
    op->dst_dt = dst_dt;
    op->ggml_type = ggml_type;
    return gpu_async_enqueue(d, op, err);
}

static int async_fill_dummy(gpu_dev *d, void *dst, mp_dtype dt, uint64_t n, uint64_t first,
                            uint64_t tseed, float low, float high, mp_error *err) {
    gpu_async_op *op = gpu_async_op_new(GPU_ASYNC_FILL, dst, NULL, n, err);
    if (!op) return -1;
    op->dst_dt = dt;
    op->first = first;
    op->tseed = tseed;
    op->low = low;
    op->high = high;
    return gpu_async_enqueue(d, op, err);
}

static int async_memset(gpu_dev *d, void *dst, int byte, uint64_t n, mp_error *err) {
    gpu_async_op *op = gpu_async_op_new(GPU_ASYNC_MEMSET, dst, NULL, n, err);
    if (!op) return -1;
    op->byte = byte;
    return gpu_async_enqueue(d, op, err);
}

const gpu_backend gpu_backend_async = {
    .name = "async",
    .kind = GPU_KIND_ASYNC,
    .host_memory = true,
    .cpu_addressable = false,
    .describe = async_describe,
    .mem_info = gpu_host_mem_info,
    .arena_alloc = async_arena_alloc,
    .arena_free = async_arena_free,
    .arena_export = async_arena_export,
    .staging_alloc = async_staging_alloc,
    .staging_free = async_staging_free,
    .stream_init = async_stream_init,
    .stream_destroy = async_stream_destroy,
    .copy_h2d = async_copy_h2d,
    .read = async_read,
    .sync = async_sync,
    .fence_create = async_fence_create,
    .fence_record = async_fence_record,
    .fence_wait = async_fence_wait,
    .fence_query = async_fence_query,
    .fence_free = async_fence_free,
    .cast = async_cast,
    .dequant = async_dequant,
    .fill_dummy = async_fill_dummy,
    .memset = async_memset,
};

int gpu_async_hold(gpu_set *s, int index, bool hold, mp_error *err) {
    if (s->be != &gpu_backend_async)
        return mp_err(err, "invalid_argument", "gpu_async_hold on a %s device", s->be->name);
    /* The sync creates the stream if needed (hold), and starts the hold on
     * an idle queue. */
    if (hold && gpu_device_sync(s, index, err) != 0) return -1;
    if (index < 0 || index >= s->n)
        return mp_err_field(err, "devices", "device_unavailable", "no device %d", index);
    pthread_mutex_lock(&s->mu);
    gpu_async_stream *st = s->dev[index].ready ? stream_of(&s->dev[index]) : NULL;
    pthread_mutex_unlock(&s->mu);
    if (!st) return 0; /* never held: nothing to release */
    pthread_mutex_lock(&st->mu);
    st->hold = hold;
    pthread_cond_signal(&st->work);
    pthread_mutex_unlock(&st->mu);
    return 0;
}
