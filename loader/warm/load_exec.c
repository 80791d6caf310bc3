/* load_exec.c - load_run: the reader threads, the staging ring and the
 * copies (see load.h).
 *
 * Work is handed out as pieces: a byte range of one item's output, at most
 * one staging slot long. A reader takes a piece, takes the oldest free slot
 * (waiting on its fence if a copy from it may still be in flight), fills the
 * slot with the piece's output bytes, queues the copy on the item's device
 * and records the slot's fence. Readers queue copies themselves: the
 * device's stream orders them, and on the host backend (where a copy is a
 * memcpy done on return) the copies then run on as many threads as reads.
 * Only the calling thread talks to the caller (progress, cancel).
 *
 * With a read_at source (bytes over the network, where a request costs a
 * round trip), a piece may be a batch: a run of whole small tensors that lie
 * next to each other in one file, fetched with one read into the reader's
 * batch buffer (one slot long) and then staged tensor by tensor from it.
 *
 * A quantized tensor (LOAD_K_QUANT) is one piece too: the reader of its
 * first part gathers the rank's piece into host memory, quantizes it once
 * (loader/quantize, on this thread for every backend: no device kernel
 * exists) and streams every part through the ring. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loader/formats/gguf/gguf.h"
#include "util/tensor/cast.h"
#include "loader/warm/warm.h"
#include "util/timeutil.h"

#define DIO_ALIGN 4096u
/* A batch may read over a hole this big between two tensors rather than
 * end (a request costs more than this many bytes on any link). */
#define BATCH_MAX_GAP (256u << 10)

typedef struct slot {
    unsigned char *buf;
    int pending_dev; /* device whose fence guards the buffer, -1 none */
    gpu_fence *fences[GPU_MAX_DEVICES];
} slot;

typedef struct run_ctx {
    gpu_set *gpus;
    const load_source *src;
    const load_plan *plan;
    const load_run_opts *o;
    gpu_arena **arenas;
    int arena_fd[GPU_MAX_DEVICES]; /* host arenas' memfds (borrowed), -1 */
    uint64_t slot_bytes;
    slot *slots;
    int nslots;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_cond_t exit_cv; /* a reader ended */
    int *fifo;              /* free slots, oldest first */
    int fifo_head, fifo_n;
    size_t next_item; /* the piece cursor */
    uint64_t next_off;
    atomic_bool abort;
    bool err_set;
    mp_error err;
    double read_s, copy_s;
    uint64_t bytes_read, reads;
    atomic_uint_fast64_t done;
    atomic_uint_fast64_t host_cur, host_peak;
    atomic_int running;
    /* load_run's own */
    int ndev, nreaders;
    struct reader *rd;
    unsigned char *staging_mem;
    /* device_convert: per device, nslots * slot_bytes of device memory,
     * slot i's raw bytes at i * slot_bytes (NULL where nothing converts) */
    gpu_arena *dev_scratch[GPU_MAX_DEVICES];
    atomic_uint_fast64_t dev_converted;
} run_ctx;

typedef struct reader {
    run_ctx *c;
    pthread_t th;
    unsigned char *scratch; /* 2 slots, allocated when a piece first needs it */
    uint64_t scratch_cap;
    unsigned char *dio; /* O_DIRECT bounce buffer */
    uint64_t dio_cap;
    stc_cache cache;
    int pipe_fd[2]; /* host fast path: file -> pipe -> arena memfd */
    bool no_splice;
    unsigned char *batch; /* read_at sources: a batch's bytes (slot_bytes) */
    double read_s, copy_s;
    uint64_t bytes_read, reads;
} reader;

static void host_add(run_ctx *c, int64_t delta) {
    uint64_t now = atomic_fetch_add(&c->host_cur, (uint64_t)delta) + (uint64_t)delta;
    uint64_t peak = atomic_load(&c->host_peak);
    while (now > peak && !atomic_compare_exchange_weak(&c->host_peak, &peak, now)) {
    }
}

static void fail(run_ctx *c, const mp_error *e) {
    pthread_mutex_lock(&c->mu);
    if (!c->err_set) {
        c->err = *e;
        c->err_set = true;
    }
    atomic_store(&c->abort, true);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static unsigned esize(mp_dtype d) {
    return mp_dtype_bits(d) / 8;
}

/* A piece is a whole number of units of the output. */
static uint64_t item_unit(const load_item *it) {
    if (it->kind == LOAD_K_DEQUANT)
        return (uint64_t)gguf_type_block_size(it->ggml_type) * esize(it->out_dtype);
    if (it->out_dtype == MP_DT_GGML || mp_dtype_bits(it->out_dtype) % 8) return 1;
    return esize(it->out_dtype);
}

/* The output is the input's bytes (a quantized part's come from memory). */
static bool item_raw(const load_item *it) {
    return it->kind == LOAD_K_QUANT || (it->slice.dim < 0 && (it->out_dtype == it->src->dtype));
}

/* Whether the item is cast or dequantized on the device: a whole tensor
 * (no slice, not a view) of a pair the device converts. */
static bool item_on_device(const run_ctx *c, const load_item *it) {
    if (!c->o->device_convert || it->slice.dim >= 0) return false;
    if (it->kind == LOAD_K_DEQUANT) return gpu_dequant_supported(it->ggml_type);
    return it->kind == LOAD_K_FILE && !item_raw(it) && it->out_dtype != MP_DT_GGML &&
           gpu_cast_supported(it->src->dtype, it->out_dtype);
}

/* The longest piece of the item: a whole number of units that fits a slot. */
static uint64_t piece_max(const run_ctx *c, const load_item *it) {
    uint64_t unit = item_unit(it);
    uint64_t max = c->slot_bytes / unit * unit;
    /* On the device the slot holds the raw bytes: a down-cast's source is
     * bigger than its output. */
    unsigned ei = esize(it->src->dtype), eo = esize(it->out_dtype);
    if (item_on_device(c, it) && it->kind == LOAD_K_FILE && ei > eo)
        max = c->slot_bytes / ei * eo / unit * unit;
    return max;
}

/* Byte offset of the tensor's first element in its file. */
static int src_base(const load_item *it, uint64_t *base, mp_error *err) {
    const mp_tensor *t = it->src;
    uint64_t start = 0;
    if (t->storage_offset != 0) {
        unsigned bits = mp_dtype_bits(t->dtype);
        if (t->storage_offset < 0 || bits % 8 ||
            __builtin_mul_overflow((uint64_t)t->storage_offset, (uint64_t)(bits / 8), &start))
            return mp_err(err, "bad_header", "tensor %s: bad storage offset", t->name);
    }
    if (start > t->data_bytes || t->nbytes > t->data_bytes - start ||
        __builtin_add_overflow(t->data_offset, start, base))
        return mp_err(err, "bad_header", "tensor %s lies outside its storage", t->name);
    return 0;
}

/* Whether the item can be part of a batch: a whole tensor read from the
 * file and staged in one piece, converted (if at all) on the CPU. Its
 * source bytes [*b, *e) of the file. */
static bool batchable(const run_ctx *c, const load_item *it, uint64_t *b, uint64_t *e) {
    mp_error ignored;
    if (it->kind != LOAD_K_FILE || item_on_device(c, it) || it->bytes > piece_max(c, it) ||
        it->src->nbytes > c->slot_bytes || src_base(it, b, &ignored) != 0)
        return false;
    *e = *b + it->src->nbytes;
    return true;
}

/* How many items from the cursor (a fresh, batchable item) go in one batch:
 * the following items of the same file whose bytes extend the span by at
 * most BATCH_MAX_GAP past its end, while the span fits a slot. Called with
 * c->mu held. */
static size_t batch_len(const run_ctx *c, size_t first) {
    const load_item *it0 = &c->plan->items[first];
    uint64_t lo, hi;
    if (!c->o->read_at || !batchable(c, it0, &lo, &hi)) return 1;
    size_t k = first + 1;
    for (; k < c->plan->nitems; k++) {
        const load_item *it = &c->plan->items[k];
        uint64_t b, e;
        if (it->file != it0->file || it->src->file_index != it0->src->file_index ||
            !batchable(c, it, &b, &e) || b < lo || b > hi + BATCH_MAX_GAP)
            break;
        uint64_t nhi = e > hi ? e : hi;
        if (nhi - lo > c->slot_bytes) break;
        hi = nhi;
    }
    return k - first;
}

/* Next piece, or false when the plan is done. A view is one piece; *nb
 * items from *it_out on are one batch (1: a plain piece). */
static bool next_piece(run_ctx *c, const load_item **it_out, uint64_t *off, uint64_t *n,
                       size_t *nb) {
    pthread_mutex_lock(&c->mu);
    bool got = false;
    *nb = 1;
    while (c->next_item < c->plan->nitems) {
        const load_item *it = &c->plan->items[c->next_item];
        /* A quantized tensor's parts after the first are written by the
         * reader of the first. */
        bool later_part = it->kind == LOAD_K_QUANT && it->part > 0;
        if (it->kind == LOAD_K_DUMMY || it->kind == LOAD_K_ZERO || later_part ||
            c->next_off >= it->bytes) {
            c->next_item++;
            c->next_off = 0;
            continue;
        }
        *it_out = it;
        *off = c->next_off;
        if (it->kind == LOAD_K_VIEW || it->kind == LOAD_K_QUANT) {
            *n = it->bytes;
        } else {
            uint64_t max = piece_max(c, it);
            *n = it->bytes - c->next_off < max ? it->bytes - c->next_off : max;
        }
        if (c->next_off == 0 && (*nb = batch_len(c, c->next_item)) > 1) {
            c->next_item += *nb; /* every item of the batch is whole */
            c->next_off = 0;
        } else {
            c->next_off += *n;
        }
        got = true;
        break;
    }
    pthread_mutex_unlock(&c->mu);
    return got;
}

/* ---- reading source bytes ---- */

static int dio_read(reader *r, int fd, uint64_t off, unsigned char *dst, uint64_t len,
                    mp_error *err) {
    while (len > 0) {
        uint64_t a = off / DIO_ALIGN * DIO_ALIGN, lead = off - a;
        uint64_t want = lead + len;
        uint64_t span = (want + DIO_ALIGN - 1) / DIO_ALIGN * DIO_ALIGN;
        if (span > r->dio_cap) span = r->dio_cap;
        ssize_t got;
        do
            got = pread(fd, r->dio, span, (off_t)a);
        while (got < 0 && errno == EINTR);
        if (got < 0) return mp_err(err, "io_error", "O_DIRECT read: %s", strerror(errno));
        if ((uint64_t)got <= lead) return mp_err(err, "truncated", "file ends early");
        uint64_t use = (uint64_t)got - lead < len ? (uint64_t)got - lead : len;
        memcpy(dst, r->dio + lead, use);
        dst += use;
        off += use;
        len -= use;
    }
    return 0;
}

/* len bytes at byte offset off of the tensor's contiguous data. mem: the
 * materialized view, when the item is one. */
static int fetch(reader *r, const load_item *it, uint64_t off, void *dst, uint64_t len,
                 const unsigned char *mem, mp_error *err) {
    if (len == 0) return 0;
    if (mem) {
        memcpy(dst, mem + off, len);
        return 0;
    }
    const load_file *f = &r->c->src->files[it->file];
    uint64_t base = 0;
    if (src_base(it, &base, err) != 0) return -1;
    if (off > it->src->nbytes || len > it->src->nbytes - off)
        return mp_err(err, "internal", "read past tensor %s", it->src->name);
    int fd = f->w->fds[it->src->file_index];
    r->bytes_read += len;
    if (r->c->o->read_at) {
        r->reads++;
        return r->c->o->read_at(r->c->o->read_arg, it->file, it->src->file_index, base + off, dst,
                                len, err);
    }
    if (f->crypt.encrypted)
        return stc_read(&f->crypt, fd, r->c->o->key, base + off, dst, len, &r->cache, err);
    if (r->dio && f->dio_fds && f->dio_fds[it->src->file_index] >= 0)
        return dio_read(r, f->dio_fds[it->src->file_index], base + off, dst, len, err);
    return weights_pread(fd, dst, len, base + off, err);
}

/* ---- converting ---- */

/* The plan only asks for casts tensor_cast does (load_plan.c asks
 * tensor_cast_supported). */
static void convert(mp_dtype from, const unsigned char *in, mp_dtype to, unsigned char *out,
                    uint64_t count) {
    (void)tensor_cast(from, in, to, out, (size_t)count);
}

/* The run of output elements starting at e: its length (<= left) and its
 * first source element, or -1 for padding. */
static uint64_t run_at(const load_item *it, uint64_t e, uint64_t left, int64_t *src_e) {
    if (it->slice.dim < 0) {
        *src_e = (int64_t)e;
        return left;
    }
    int d = it->slice.dim;
    uint64_t inner = 1;
    for (int k = d + 1; k < it->ndim; k++)
        inner *= (uint64_t)it->shape[k];
    uint64_t out_row = (uint64_t)it->shape[d] * inner;
    uint64_t src_row = (uint64_t)it->src->shape[d] * inner;
    uint64_t o = e / out_row, w = e % out_row, base = 0;
    for (int j = 0; j < it->slice.nseg; j++) {
        uint64_t len = (uint64_t)it->slice.seg[j].len * inner;
        if (w < base + len) {
            uint64_t run = base + len - w;
            if (run > left) run = left;
            *src_e = it->slice.seg[j].start < 0
                         ? -1
                         : (int64_t)(o * src_row + (uint64_t)it->slice.seg[j].start * inner +
                                     (w - base));
            return run;
        }
        base += len;
    }
    *src_e = -1; /* unreachable for a consistent plan */
    return left;
}

/* Plain copies need no scratch: only casts, slices and dequantization. */
static int need_scratch(reader *r, mp_error *err) {
    if (r->scratch) return 0;
    if (posix_memalign((void **)&r->scratch, DIO_ALIGN, r->scratch_cap) != 0) {
        r->scratch = NULL;
        return mp_err(err, "no_memory", "out of memory");
    }
    host_add(r->c, (int64_t)r->scratch_cap);
    return 0;
}

/* Fills dst with output bytes [off, off+n) of the item. */
static int produce(reader *r, const load_item *it, uint64_t off, uint64_t n, unsigned char *dst,
                   const unsigned char *mem, mp_error *err) {
    if (it->kind == LOAD_K_ZERO) {
        memset(dst, 0, n);
        return 0;
    }
    if ((it->kind == LOAD_K_DEQUANT || !item_raw(it)) && need_scratch(r, err) != 0) return -1;
    if (it->kind == LOAD_K_DEQUANT) {
        unsigned bs = gguf_type_block_size(it->ggml_type),
                 bb = gguf_type_block_bytes(it->ggml_type);
        uint64_t e0 = off / esize(it->out_dtype), k = n / esize(it->out_dtype);
        uint64_t soff = e0 / bs * bb, slen = k / bs * bb;
        if (slen > r->scratch_cap) return mp_err(err, "internal", "dequant piece too large");
        if (fetch(r, it, soff, r->scratch, slen, mem, err) != 0) return -1;
        return gguf_dequant(it->ggml_type, r->scratch, slen, (int64_t)k, it->out_dtype, dst, err);
    }
    if (item_raw(it)) return fetch(r, it, off, dst, n, mem, err);
    mp_dtype sd = it->src->dtype, od = it->out_dtype;
    unsigned ei = esize(sd), eo = esize(od);
    uint64_t e0 = off / eo, k = n / eo;
    /* Pass 1: the span of source elements the piece touches. */
    int64_t lo = -1, hi = -1;
    for (uint64_t e = e0; e < e0 + k;) {
        int64_t s;
        uint64_t run = run_at(it, e, e0 + k - e, &s);
        if (s >= 0) {
            if (lo < 0 || s < lo) lo = s;
            if ((int64_t)(s + (int64_t)run) > hi) hi = s + (int64_t)run;
        }
        e += run;
    }
    bool one_read = lo >= 0 && (uint64_t)(hi - lo) * ei <= r->scratch_cap;
    if (one_read &&
        fetch(r, it, (uint64_t)lo * ei, r->scratch, (uint64_t)(hi - lo) * ei, mem, err) != 0)
        return -1;
    /* Pass 2: gather (and convert) run by run. */
    for (uint64_t e = e0; e < e0 + k;) {
        int64_t s;
        uint64_t run = run_at(it, e, e0 + k - e, &s);
        unsigned char *out = dst + (e - e0) * eo;
        if (s < 0) {
            memset(out, 0, run * eo);
        } else if (one_read) {
            convert(sd, r->scratch + (uint64_t)(s - lo) * ei, od, out, run);
        } else if (sd == od) {
            if (fetch(r, it, (uint64_t)s * ei, out, run * ei, mem, err) != 0) return -1;
        } else {
            if (run * ei > r->scratch_cap) return mp_err(err, "internal", "run too large");
            if (fetch(r, it, (uint64_t)s * ei, r->scratch, run * ei, mem, err) != 0) return -1;
            convert(sd, r->scratch, od, out, run);
        }
        e += run;
    }
    return 0;
}

/* ---- the staging ring ---- */

static slot *slot_take(reader *r, mp_error *err) {
    run_ctx *c = r->c;
    pthread_mutex_lock(&c->mu);
    while (c->fifo_n == 0 && !atomic_load(&c->abort))
        pthread_cond_wait(&c->cv, &c->mu);
    if (atomic_load(&c->abort)) {
        pthread_mutex_unlock(&c->mu);
        return NULL;
    }
    slot *s = &c->slots[c->fifo[c->fifo_head]];
    c->fifo_head = (c->fifo_head + 1) % c->nslots;
    c->fifo_n--;
    pthread_mutex_unlock(&c->mu);
    if (s->pending_dev >= 0) {
        double t0 = time_mono();
        int rc = gpu_fence_wait(s->fences[s->pending_dev], err);
        r->copy_s += time_mono() - t0;
        s->pending_dev = -1;
        if (rc != 0) {
            fail(c, err);
            return NULL;
        }
    }
    return s;
}

static void slot_give(run_ctx *c, slot *s) {
    pthread_mutex_lock(&c->mu);
    c->fifo[(c->fifo_head + c->fifo_n) % c->nslots] = (int)(s - c->slots);
    c->fifo_n++;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Moves len bytes of the file at off into the arena's memfd at dst_off
 * inside the kernel (page cache -> pipe -> shmem): one copy, and no page
 * faults on the arena's mapping, which cost more than the copy itself.
 * 1 when splice is unusable here (the caller falls back to pread). */
static int splice_piece(reader *r, int in_fd, uint64_t off, int out_fd, uint64_t dst_off,
                        uint64_t len, mp_error *err) {
    if (r->pipe_fd[0] < 0) {
        if (pipe2(r->pipe_fd, O_CLOEXEC) != 0) return 1;
        fcntl(r->pipe_fd[1], F_SETPIPE_SZ, 1 << 20);
    }
    while (len > 0) {
        loff_t oi = (loff_t)off, oo = (loff_t)dst_off;
        size_t want = len < (1u << 20) ? (size_t)len : (1u << 20);
        ssize_t n = splice(in_fd, &oi, r->pipe_fd[1], NULL, want, SPLICE_F_MOVE);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EINVAL || errno == ENOSYS)) return 1;
        if (n < 0) return mp_err(err, "io_error", "splice: %s", strerror(errno));
        if (n == 0) return mp_err(err, "truncated", "file ends early");
        for (ssize_t left = n; left > 0;) {
            ssize_t k = splice(r->pipe_fd[0], NULL, out_fd, &oo, (size_t)left, SPLICE_F_MOVE);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) {
                /* The pipe now holds bytes we cannot return: drop it. */
                close(r->pipe_fd[0]);
                close(r->pipe_fd[1]);
                r->pipe_fd[0] = r->pipe_fd[1] = -1;
                return mp_err(err, "io_error", "splice into the arena: %s", strerror(errno));
            }
            left -= k;
        }
        off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* A piece converted on the device: its raw source bytes into a slot, copied
 * to the slot's part of the device scratch, then the kernel from there into
 * the arena; the slot's fence is recorded after the kernel, so the next
 * user of the slot (which reuses its scratch part too) comes after it on
 * the stream. */
static int device_piece(reader *r, const load_item *it, uint64_t off, uint64_t n, mp_error *err) {
    run_ctx *c = r->c;
    gpu_arena *a = c->arenas[it->device], *scr = c->dev_scratch[it->device];
    if (!scr) return mp_err(err, "internal", "no device scratch for %s", it->src->name);
    uint64_t e0 = off / esize(it->out_dtype), k = n / esize(it->out_dtype), soff, slen;
    if (it->kind == LOAD_K_DEQUANT) {
        unsigned bs = gguf_type_block_size(it->ggml_type),
                 bb = gguf_type_block_bytes(it->ggml_type);
        soff = e0 / bs * bb;
        slen = k / bs * bb;
    } else {
        soff = e0 * esize(it->src->dtype);
        slen = k * esize(it->src->dtype);
    }
    if (slen > c->slot_bytes) return mp_err(err, "internal", "raw piece larger than a slot");
    slot *s = slot_take(r, err);
    if (!s) return -1;
    uint64_t at = (uint64_t)(s - c->slots) * c->slot_bytes;
    double t0 = time_mono();
    int rc = fetch(r, it, soff, s->buf, slen, NULL, err);
    double t1 = time_mono();
    r->read_s += t1 - t0;
    if (rc == 0) rc = gpu_copy_h2d(scr, at, s->buf, slen, err);
    if (rc == 0)
        rc = it->kind == LOAD_K_DEQUANT
                 ? gpu_dequant(a, it->offset + off, it->out_dtype, scr, at, it->ggml_type, k, err)
                 : gpu_cast(a, it->offset + off, it->out_dtype, scr, at, it->src->dtype, k, err);
    if (rc == 0 && (rc = gpu_fence_record(s->fences[it->device], err)) == 0)
        s->pending_dev = it->device;
    r->copy_s += time_mono() - t1;
    slot_give(c, s);
    if (rc == 0) {
        atomic_fetch_add(&c->done, n);
        atomic_fetch_add(&c->dev_converted, n);
    }
    return rc;
}

static int do_piece(reader *r, const load_item *it, uint64_t off, uint64_t n,
                    const unsigned char *mem, mp_error *err) {
    run_ctx *c = r->c;
    gpu_arena *a = c->arenas[it->device];
    unsigned char *host = c->o->host_direct ? gpu_arena_host_ptr(a) : NULL;
    if (host && !mem && item_raw(it) && it->kind == LOAD_K_FILE &&
        !c->src->files[it->file].crypt.encrypted && !r->dio) {
        double t0 = time_mono();
        int rc = 1;
        const load_file *f = &c->src->files[it->file];
        uint64_t base = 0;
        if (!r->no_splice && c->arena_fd[it->device] >= 0 && src_base(it, &base, err) == 0) {
            rc = splice_piece(r, f->w->fds[it->src->file_index], base + off,
                              c->arena_fd[it->device], it->offset + off, n, err);
            if (rc == 0) r->bytes_read += n;
            if (rc == 1) r->no_splice = true;
        }
        if (rc == 1) rc = fetch(r, it, off, host + it->offset + off, n, NULL, err);
        r->read_s += time_mono() - t0;
        if (rc == 0) atomic_fetch_add(&c->done, n);
        return rc;
    }
    if (!mem && item_on_device(c, it)) return device_piece(r, it, off, n, err);
    slot *s = slot_take(r, err);
    if (!s) return -1;
    double t0 = time_mono();
    int rc = produce(r, it, off, n, s->buf, mem, err);
    double t1 = time_mono();
    r->read_s += t1 - t0;
    if (rc == 0) rc = gpu_copy_h2d(a, it->offset + off, s->buf, n, err);
    if (rc == 0 && (rc = gpu_fence_record(s->fences[it->device], err)) == 0)
        s->pending_dev = it->device;
    r->copy_s += time_mono() - t1;
    slot_give(c, s);
    if (rc == 0) atomic_fetch_add(&c->done, n);
    return rc;
}

/* A batch of nb whole items (next_piece): their span of the file in one
 * read_at, then each item staged from the batch buffer. */
static int do_batch(reader *r, const load_item *first, size_t nb, mp_error *err) {
    run_ctx *c = r->c;
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t k = 0; k < nb; k++) {
        uint64_t b;
        if (src_base(&first[k], &b, err) != 0) return -1;
        if (b < lo) lo = b;
        if (b + first[k].src->nbytes > hi) hi = b + first[k].src->nbytes;
    }
    if (hi - lo > c->slot_bytes) return mp_err(err, "internal", "batch larger than a slot");
    if (!r->batch) {
        if (posix_memalign((void **)&r->batch, DIO_ALIGN, c->slot_bytes) != 0) {
            r->batch = NULL;
            return mp_err(err, "no_memory", "out of memory");
        }
        host_add(c, (int64_t)c->slot_bytes);
    }
    double t0 = time_mono();
    int rc = c->o->read_at(c->o->read_arg, first->file, first->src->file_index, lo, r->batch,
                           hi - lo, err);
    r->read_s += time_mono() - t0;
    r->reads++;
    r->bytes_read += hi - lo;
    for (size_t k = 0; rc == 0 && k < nb && !atomic_load(&c->abort); k++) {
        uint64_t b;
        if (first[k].bytes == 0) continue; /* an empty tensor: nothing to stage */
        rc = src_base(&first[k], &b, err);
        if (rc == 0) rc = do_piece(r, &first[k], 0, first[k].bytes, r->batch + (b - lo), err);
    }
    return rc;
}

/* Streams bytes [0, it->bytes) of an item held in host memory (mem)
 * through the ring, a slot at a time. */
static int stream_from_memory(reader *r, const load_item *it, const unsigned char *mem,
                              mp_error *err) {
    run_ctx *c = r->c;
    uint64_t unit = item_unit(it), max = c->slot_bytes / unit * unit;
    int rc = 0;
    for (uint64_t p = 0; rc == 0 && p < it->bytes && !atomic_load(&c->abort); p += max) {
        uint64_t m = it->bytes - p < max ? it->bytes - p : max;
        rc = do_piece(r, it, p, m, mem, err);
    }
    return rc;
}

/* Host memory the reader holds for a while, counted in peak_host_bytes. */
static unsigned char *held_alloc(run_ctx *c, uint64_t n) {
    unsigned char *p = malloc(n ? n : 1);
    if (p) host_add(c, (int64_t)n);
    return p;
}

static void held_free(run_ctx *c, unsigned char *p, uint64_t n) {
    if (!p) return;
    free(p);
    host_add(c, -(int64_t)n);
}

/* The rank's piece of a quantized tensor, in the source dtype, gathered
 * into *out (rows x cols of the quant plan): a strided view is
 * materialized whole first, a tensor-parallel slice gathered run by run as
 * any sliced item is. */
static int quant_gather(reader *r, const load_item *it, const qz_plan *qp, unsigned char **out,
                        uint64_t *out_bytes, mp_error *err) {
    run_ctx *c = r->c;
    load_item piece = *it;
    piece.kind = LOAD_K_FILE;
    piece.out_dtype = it->src->dtype;
    piece.ndim = 2;
    memset(piece.shape, 0, sizeof piece.shape);
    piece.shape[0] = (int64_t)qp->rows;
    piece.shape[1] = (int64_t)qp->cols;
    piece.bytes = qp->rows * qp->cols * esize(piece.out_dtype);
    unsigned char *view = NULL, *buf = held_alloc(c, piece.bytes);
    if (!buf) return mp_err(err, "no_memory", "cannot hold %s for quantization", it->src->name);
    int rc = 0;
    double t0 = time_mono();
    if (it->src->is_view) {
        if (!(view = held_alloc(c, it->src->nbytes)))
            rc = mp_err(err, "no_memory", "cannot materialize view %s", it->src->name);
        if (rc == 0 && (rc = weights_read(c->src->files[it->file].w, it->src, view, err)) == 0)
            r->bytes_read += it->src->nbytes;
    }
    if (rc == 0) rc = produce(r, &piece, 0, piece.bytes, buf, view, err);
    r->read_s += time_mono() - t0;
    held_free(c, view, it->src->nbytes);
    if (rc != 0) {
        held_free(c, buf, piece.bytes);
        return -1;
    }
    *out = buf;
    *out_bytes = piece.bytes;
    return 0;
}

/* A quantized (tensor, rank), from its first part's item: gathered,
 * quantized once into every part, and each part (the items after `it`)
 * streamed through the ring. Host memory held: the piece, then its parts. */
static int quant_group(reader *r, const load_item *it, mp_error *err) {
    run_ctx *c = r->c;
    const qz_plan *qp = &c->plan->quants[it->quant].qz;
    size_t first = (size_t)(it - c->plan->items);
    if (it->part != 0 || first + (size_t)qp->n > c->plan->nitems)
        return mp_err(err, "internal", "quantized parts of %s out of order", it->src->name);
    unsigned char *piece = NULL, *parts[QZ_MAX_PARTS] = {0};
    uint64_t piece_bytes = 0;
    if (quant_gather(r, it, qp, &piece, &piece_bytes, err) != 0) return -1;
    int rc = 0;
    for (int k = 0; rc == 0 && k < qp->n; k++)
        if (!(parts[k] = held_alloc(c, qp->parts[k].nbytes)))
            rc = mp_err(err, "no_memory", "cannot hold %s", qp->parts[k].name);
    if (rc == 0) {
        double t0 = time_mono();
        rc = qz_quantize(&c->plan->qparams, qp, it->src->dtype, piece, (void *const *)parts, err);
        r->read_s += time_mono() - t0;
    }
    held_free(c, piece, piece_bytes);
    for (int k = 0; rc == 0 && k < qp->n && !atomic_load(&c->abort); k++) {
        const load_item *pk = &c->plan->items[first + (size_t)k];
        if (pk->kind != LOAD_K_QUANT || pk->quant != it->quant || pk->part != k)
            rc = mp_err(err, "internal", "quantized parts of %s out of order", it->src->name);
        else
            rc = stream_from_memory(r, pk, parts[k], err);
    }
    for (int k = 0; k < qp->n; k++)
        held_free(c, parts[k], qp->parts[k].nbytes);
    return rc;
}

static void *reader_main(void *arg) {
    reader *r = arg;
    run_ctx *c = r->c;
    mp_error err = {0};
    const load_item *it;
    uint64_t off, n;
    size_t nb;
    while (!atomic_load(&c->abort) && next_piece(c, &it, &off, &n, &nb)) {
        int rc = 0;
        if (nb > 1) {
            rc = do_batch(r, it, nb, &err);
        } else if (it->kind == LOAD_K_VIEW) {
            /* A strided view is gathered whole by the reader, then cut. */
            unsigned char *mem = malloc(it->src->nbytes ? it->src->nbytes : 1);
            if (!mem) {
                mp_err(&err, "no_memory", "cannot materialize view %s", it->src->name);
                rc = -1;
            } else {
                host_add(c, (int64_t)it->src->nbytes);
                double t0 = time_mono();
                rc = weights_read(c->src->files[it->file].w, it->src, mem, &err);
                r->read_s += time_mono() - t0;
                r->bytes_read += it->src->nbytes;
                if (rc == 0) rc = stream_from_memory(r, it, mem, &err);
                free(mem);
                host_add(c, -(int64_t)it->src->nbytes);
            }
        } else if (it->kind == LOAD_K_QUANT) {
            rc = quant_group(r, it, &err);
        } else {
            rc = do_piece(r, it, off, n, NULL, &err);
        }
        if (rc != 0) {
            if (!atomic_load(&c->abort) || err.code[0]) fail(c, &err);
            break;
        }
    }
    pthread_mutex_lock(&c->mu);
    c->read_s += r->read_s;
    c->copy_s += r->copy_s;
    c->bytes_read += r->bytes_read;
    c->reads += r->reads;
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_lock(&c->mu);
    atomic_fetch_sub(&c->running, 1);
    pthread_cond_signal(&c->exit_cv);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- load_run ---- */

static int default_readers(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 2) n = 2;
    if (n > 16) n = 16; /* a GPU wants ~16 concurrent 4 MiB preads to fill PCIe 5 */
    return (int)n;
}

/* What the readers do not write, done on the devices' streams before they
 * start: dummy tensors, zero tensors (a memset on the device instead of
 * zeros sent through staging), and, in an arena reused from the pool, the
 * alignment gaps between tensors and the tail, which still hold an earlier
 * load's bytes that an importer of this arena must not see. Offsets grow
 * in item order per device (load_plan.c item_place). */
static int fill_dummies(run_ctx *c, mp_error *err) {
    gpu_dummy_params p = {
        .seed = c->o->dummy_seed, .low = c->o->dummy_low, .high = c->o->dummy_high, .first = 0};
    uint64_t end[GPU_MAX_DEVICES] = {0};
    for (size_t i = 0; i <= c->plan->nitems; i++) {
        if (i == c->plan->nitems) {
            for (int d = 0; d < c->ndev; d++) {
                gpu_arena *a = c->arenas[d];
                if (a && gpu_arena_reused(a) && end[d] < gpu_arena_size(a) &&
                    gpu_memset(a, end[d], 0, gpu_arena_size(a) - end[d], err) != 0)
                    return -1;
            }
            break;
        }
        const load_item *it = &c->plan->items[i];
        gpu_arena *a = c->arenas[it->device];
        if (!a) continue; /* a device whose items are all empty has no arena */
        if (gpu_arena_reused(a) && it->offset > end[it->device] &&
            gpu_memset(a, end[it->device], 0, it->offset - end[it->device], err) != 0)
            return -1;
        end[it->device] = it->offset + it->bytes;
        if (it->kind == LOAD_K_ZERO && it->bytes) {
            if (gpu_memset(a, it->offset, 0, it->bytes, err) != 0) return -1;
            atomic_fetch_add(&c->done, it->bytes);
            continue;
        }
        if (it->kind != LOAD_K_DUMMY || it->bytes == 0) continue;
        if (c->o->cancelled && c->o->cancelled(c->o->cb))
            return mp_err(err, "cancelled", "cancelled");
        uint64_t numel = it->bytes / esize(it->out_dtype);
        if (gpu_fill_dummy(c->arenas[it->device], it->offset, it->out_dtype, numel, it->src->name,
                           &p, err) != 0)
            return -1;
        atomic_fetch_add(&c->done, it->bytes);
    }
    return 0;
}

/* Fails when a device does not have the free memory its arena needs;
 * records each device's free bytes. */
static int check_free_memory(gpu_set *gpus, const load_plan *plan, int ndev, load_stats *st,
                             mp_error *err) {
    for (int d = 0; d < ndev; d++) {
        gpu_device_info info;
        if (gpu_device_info_get(gpus, d, &info, err) != 0) return -1;
        st->free_before[d] = info.free_bytes;
        if (plan->arena_bytes[d] > info.free_bytes)
            return mp_err(
                err, "insufficient_device_memory", "device %d: %llu bytes needed, %llu free", d,
                (unsigned long long)plan->arena_bytes[d], (unsigned long long)info.free_bytes);
    }
    return 0;
}

/* One arena per device the plan uses; those made before a failure stay in
 * arenas[] for the caller to free. */
static int alloc_arenas(gpu_set *gpus, const load_plan *plan, int ndev,
                        gpu_arena *arenas[GPU_MAX_DEVICES], mp_error *err) {
    for (int d = 0; d < ndev; d++) {
        if (!plan->arena_bytes[d]) continue;
        int a = gpu_arena_alloc(gpus, d, plan->arena_bytes[d], &arenas[d], err);
        if (a == GPU_NOMEM)
            return mp_err_wrap(err, "insufficient_device_memory", "device %d", d);
        else if (a != 0)
            return -1;
    }
    return 0;
}

static void run_ctx_init(run_ctx *c, gpu_set *gpus, const load_source *src, const load_plan *plan,
                         const load_run_opts *o, gpu_arena **arenas, int ndev) {
    memset(c, 0, sizeof *c);
    c->gpus = gpus;
    c->src = src;
    c->plan = plan;
    c->o = o;
    c->arenas = arenas;
    c->ndev = ndev;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->exit_cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&c->abort, false);
    atomic_init(&c->done, 0);
    atomic_init(&c->host_cur, 0);
    atomic_init(&c->host_peak, 0);
    atomic_init(&c->running, 0);
    atomic_init(&c->dev_converted, 0);
}

/* Sizes the staging ring and the reader count: no more staging than the
 * plan can fill, two slots per reader at least, 64 slots at most, and one
 * slot more than readers. */
static void size_ring(run_ctx *c) {
    const load_run_opts *o = c->o;
    uint64_t staging = o->staging_bytes ? o->staging_bytes : LOAD_DEFAULT_STAGING;
    uint64_t need = c->plan->total_bytes + DIO_ALIGN;
    if (staging > need) staging = need;
    if (staging < LOAD_MIN_STAGING) staging = LOAD_MIN_STAGING;
    int nreaders = o->readers > 0 ? o->readers : default_readers();
    /* 4 MiB slots; 8 MiB from a read_at source, where a slot is one request
     * and each request costs a round trip */
    uint64_t nslots = staging / (o->read_at ? 8ull << 20 : 4ull << 20);
    if (nslots < (uint64_t)nreaders * 2) nslots = (uint64_t)nreaders * 2;
    if (nslots > 64) nslots = 64;
    c->slot_bytes = staging / nslots / DIO_ALIGN * DIO_ALIGN;
    if (c->slot_bytes < DIO_ALIGN) c->slot_bytes = DIO_ALIGN;
    c->nslots = (int)nslots;
    if (nreaders > c->nslots - 1) nreaders = c->nslots - 1;
    c->nreaders = nreaders;
}

/* The readers' array, the slots over one staging buffer, a fence per slot
 * and device, and the free-slot FIFO. */
static int ring_alloc(run_ctx *c, mp_error *err) {
    c->rd = calloc((size_t)c->nreaders, sizeof *c->rd);
    c->slots = calloc((size_t)c->nslots, sizeof *c->slots);
    c->fifo = calloc((size_t)c->nslots, sizeof *c->fifo);
    for (int i = 0; c->rd && i < c->nreaders; i++)
        c->rd[i].pipe_fd[0] = c->rd[i].pipe_fd[1] = -1;
    if (!c->rd || !c->slots || !c->fifo) return mp_err(err, "no_memory", "out of memory");
    uint64_t bytes = c->slot_bytes * (uint64_t)c->nslots;
    int s = gpu_staging_alloc(c->gpus, bytes, (void **)&c->staging_mem, err);
    /* Over the set's staging cap keeps its own code: the load asked too much
     * of a configured limit, the host is not out of memory. */
    if (s == GPU_NOMEM)
        return mp_err_wrap(err,
                           strcmp(err->code, "staging_cap") ? "insufficient_host_memory" : NULL,
                           "pinned staging");
    if (s != 0) return -1;
    host_add(c, (int64_t)bytes);
    /* Device scratch where something converts on the device. */
    for (size_t i = 0; c->o->device_convert && i < c->plan->nitems; i++) {
        const load_item *it = &c->plan->items[i];
        if (!item_on_device(c, it) || c->dev_scratch[it->device]) continue;
        int a = gpu_arena_alloc(c->gpus, it->device, bytes, &c->dev_scratch[it->device], err);
        if (a == GPU_NOMEM)
            return mp_err_wrap(err, "insufficient_device_memory",
                               "device %d: scratch for conversion on the device", it->device);
        if (a != 0) return -1;
    }
    for (int i = 0; i < c->nslots; i++) {
        c->slots[i].buf = c->staging_mem + (uint64_t)i * c->slot_bytes;
        c->slots[i].pending_dev = -1;
        c->fifo[i] = i;
        for (int d = 0; d < c->ndev; d++)
            if (c->arenas[d] && gpu_fence_create(c->gpus, d, &c->slots[i].fences[d], err) != 0)
                return -1;
    }
    return 0;
}

/* The memfds of fresh host arenas, for splice (-1 elsewhere). A fresh
 * memfd's pages are not mapped here yet: splice fills them without a page
 * fault each (prefaulting with MADV_POPULATE_WRITE cost more than the faults
 * it saves here). An arena from the pool gets a pread straight into its
 * mapping instead: once its pages are mapped (from its second reuse on) that
 * is one plain copy, 1.3-1.5x faster than splice, whose writers also meet on
 * the memfd's inode lock. */
static void arena_fds(run_ctx *c) {
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        c->arena_fd[d] =
            c->arenas[d] && !gpu_arena_reused(c->arenas[d]) ? gpu_arena_host_fd(c->arenas[d]) : -1;
}

static int readers_init(run_ctx *c, mp_error *err) {
    bool dio = c->o->direct_io && !c->o->read_at;
    for (int i = 0; i < c->nreaders; i++) {
        reader *r = &c->rd[i];
        r->c = c;
        r->no_splice = c->o->read_at != NULL; /* no descriptor to splice from */
        r->scratch_cap = 2 * c->slot_bytes;
        r->dio_cap = dio ? c->slot_bytes + 2 * DIO_ALIGN : 0;
        if (dio && posix_memalign((void **)&r->dio, DIO_ALIGN, r->dio_cap) != 0)
            return mp_err(err, "no_memory", "out of memory");
        host_add(c, (int64_t)r->dio_cap);
    }
    return 0;
}

/* Starts the readers; a thread that cannot start fails the run (the ones
 * started see the abort). Returns how many started. */
static int start_readers(run_ctx *c) {
    int started = 0;
    for (int i = 0; i < c->nreaders; i++) {
        atomic_fetch_add(&c->running, 1);
        if (pthread_create(&c->rd[i].th, NULL, reader_main, &c->rd[i]) != 0) {
            atomic_fetch_sub(&c->running, 1);
            mp_error e;
            mp_err(&e, "internal", "cannot start a reader thread");
            fail(c, &e);
            break;
        }
        started++;
    }
    return started;
}

/* Until the last reader ends: the caller's progress and cancel, from this
 * thread only. */
static void watch_readers(run_ctx *c) {
    const load_run_opts *o = c->o;
    bool cancelled = false;
    for (;;) {
        /* Wake on a reader's exit, or every 20 ms for progress and cancel. */
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->running) > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 20000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&c->exit_cv, &c->mu, &ts);
        }
        bool more = atomic_load(&c->running) > 0;
        pthread_mutex_unlock(&c->mu);
        if (!more) break;
        if (o->progress) o->progress(o->cb, atomic_load(&c->done), c->plan->total_bytes);
        if (!cancelled && o->cancelled && o->cancelled(o->cb)) {
            cancelled = true;
            mp_error e;
            mp_err(&e, "cancelled", "cancelled");
            fail(c, &e);
        }
    }
}

/* The dummies, then the readers to their end; rc is the setup's outcome
 * (nothing runs unless 0). The devices are synced either way, so that no
 * copy is in flight when the ring is freed. */
static int run_pipeline(run_ctx *c, int rc, mp_error *err) {
    const load_run_opts *o = c->o;
    if (rc == 0) {
        double f0 = time_mono();
        rc = fill_dummies(c, err);
        c->copy_s += time_mono() - f0;
    }
    int started = rc == 0 ? start_readers(c) : 0;
    watch_readers(c);
    for (int i = 0; i < started; i++)
        pthread_join(c->rd[i].th, NULL);
    if (rc == 0 && c->err_set) {
        *err = c->err;
        rc = -1;
    }
    if (rc == 0 && o->cancelled && o->cancelled(o->cb)) rc = mp_err(err, "cancelled", "cancelled");
    double s0 = time_mono();
    for (int d = 0; d < c->ndev; d++) {
        mp_error se = {0};
        if (c->arenas[d] && gpu_device_sync(c->gpus, d, &se) != 0 && rc == 0) {
            *err = se;
            rc = -1;
        }
    }
    c->copy_s += time_mono() - s0;
    if (rc == 0 && o->progress) o->progress(o->cb, atomic_load(&c->done), c->plan->total_bytes);
    return rc;
}

static void run_teardown(run_ctx *c) {
    for (int i = 0; i < c->nreaders && c->rd; i++) {
        free(c->rd[i].scratch);
        free(c->rd[i].dio);
        free(c->rd[i].batch);
        stc_cache_free(&c->rd[i].cache);
        if (c->rd[i].pipe_fd[0] >= 0) close(c->rd[i].pipe_fd[0]);
        if (c->rd[i].pipe_fd[1] >= 0) close(c->rd[i].pipe_fd[1]);
    }
    free(c->rd);
    for (int i = 0; c->slots && i < c->nslots; i++)
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            gpu_fence_free(c->slots[i].fences[d]);
    free(c->slots);
    free(c->fifo);
    /* run_pipeline synced the devices: no kernel reads the scratch now. */
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        gpu_arena_free(c->dev_scratch[d]);
    if (c->staging_mem) gpu_staging_free(c->gpus, c->staging_mem);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    pthread_cond_destroy(&c->exit_cv);
}

int load_run(gpu_set *gpus, const load_source *src, const load_plan *plan, const load_run_opts *o,
             gpu_arena *arenas[GPU_MAX_DEVICES], load_stats *st, mp_error *err) {
    memset(st, 0, sizeof *st);
    for (int i = 0; i < GPU_MAX_DEVICES; i++)
        arenas[i] = NULL;
    int ndev = gpu_set_count(gpus);
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        if (plan->arena_bytes[d] && d >= ndev)
            return mp_err(err, "bad_request", "device %d is not in the set", d);
    if (src->encrypted && !o->key)
        return mp_err(err, "decryption_key_required",
                      "the checkpoint is encrypted: give decryption_key_file");

    /* Free memory first: nothing is allocated unless everything fits. */
    double t0 = time_mono();
    if (check_free_memory(gpus, plan, ndev, st, err) != 0) return -1;
    int rc = alloc_arenas(gpus, plan, ndev, arenas, err);
    st->alloc_s = time_mono() - t0;

    /* From here on every step runs only while rc is 0, but the pipeline's
     * device sync and the teardown run whatever happened. */
    run_ctx c;
    run_ctx_init(&c, gpus, src, plan, o, arenas, ndev);
    size_ring(&c);
    if (rc == 0) rc = ring_alloc(&c, err);
    c.fifo_n = c.nslots;
    arena_fds(&c);
    if (rc == 0) rc = readers_init(&c, err);

    double p0 = time_mono();
    rc = run_pipeline(&c, rc, err);
    st->pipeline_s = time_mono() - p0;
    run_teardown(&c);

    st->read_s = c.read_s;
    st->copy_s = c.copy_s;
    st->bytes_read = c.bytes_read;
    st->reads = c.reads;
    st->peak_host_bytes = atomic_load(&c.host_peak);
    st->readers = c.nreaders;
    st->slots = c.nslots;
    st->slot_bytes = c.slot_bytes;
    st->device_converted = atomic_load(&c.dev_converted);
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        st->reused[d] = arenas[d] && gpu_arena_reused(arenas[d]);
    if (rc != 0)
        for (int d = 0; d < GPU_MAX_DEVICES; d++) {
            gpu_arena_free(arenas[d]);
            arenas[d] = NULL;
        }
    for (int d = 0; d < ndev; d++) {
        gpu_device_info info;
        mp_error ie;
        st->free_after[d] = gpu_device_info_get(gpus, d, &info, &ie) == 0 ? info.free_bytes : 0;
    }
    return rc;
}
