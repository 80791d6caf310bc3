/*
 * shard.c - the sharded-state writer behind the shard job: plan parts from
 * the tp layout, stream every source tensor's slices into every rank's open
 * safetensors writer, re-read and check what was written, copy the config
 * and tokenizer files, write the manifest, publish by rename. See shard.h.
 */
#include "loader/shard/shard.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/crc32c.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/weights.h"
#include "util/fsutil.h"

/* Ranks written at once; a larger tp re-reads the source once per group so
 * that open file descriptors stay bounded. */
#define SHARD_RANK_GROUP 256
#define SHARD_MAX_COPY (512u << 20)
#define SHARD_MAX_THREADS 8
#define SHARD_WRITEBACK (64u << 20)
#define SHARD_STEP (512u << 10)

/* ------------------------------------------------------------------------ */
/* a small worker pool: run fn(item) for items [0, n) on the workers and the
 * calling thread. Ranks are independent files, so a piece's ranks (and the
 * final fsyncs and checks) proceed in parallel.                              */

typedef struct worker_buf {
    unsigned char *rbuf, *gbuf; /* pread fallback, gather */
    size_t rcap, gcap;
} worker_buf;

typedef void (*pool_fn)(void *arg, int item, worker_buf *wb);

typedef struct pool {
    pthread_t th[SHARD_MAX_THREADS];
    int n; /* started workers */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    pool_fn fn;
    void *arg;
    int items, next, finished;
    unsigned gen;
    bool quit;
    worker_buf wb[SHARD_MAX_THREADS + 1]; /* [n] is the caller's */
} pool;

typedef struct pool_worker {
    pool *p;
    int id;
} pool_worker;

static void pool_drain(pool *p, worker_buf *wb) {
    /* called with p->mu held; returns with it held */
    while (p->next < p->items) {
        int it = p->next++;
        pthread_mutex_unlock(&p->mu);
        p->fn(p->arg, it, wb);
        pthread_mutex_lock(&p->mu);
        if (++p->finished == p->items) pthread_cond_broadcast(&p->done);
    }
}

static void *pool_main(void *arg) {
    pool_worker *w = arg;
    pool *p = w->p;
    int id = w->id;
    free(w);
    unsigned seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->gen == seen)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) break;
        seen = p->gen;
        pool_drain(p, &p->wb[id]);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static int pool_start(pool *p, int nthreads) {
    memset(p, 0, sizeof *p);
    if (pthread_mutex_init(&p->mu, NULL) != 0) return -1;
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 0; i < nthreads && i < SHARD_MAX_THREADS; i++) {
        pool_worker *w = malloc(sizeof *w);
        if (!w) break;
        w->p = p;
        w->id = i;
        if (pthread_create(&p->th[i], NULL, pool_main, w) != 0) {
            free(w);
            break; /* fewer workers is fine; the caller always helps */
        }
        p->n++;
    }
    return 0;
}

static void pool_run(pool *p, pool_fn fn, void *arg, int items) {
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->items = items;
    p->next = p->finished = 0;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pool_drain(p, &p->wb[p->n]);
    while (p->finished < p->items)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static void pool_stop(pool *p) {
    pthread_mutex_lock(&p->mu);
    p->quit = true;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n; i++)
        pthread_join(p->th[i], NULL);
    for (int i = 0; i <= SHARD_MAX_THREADS; i++) {
        free(p->wb[i].rbuf);
        free(p->wb[i].gbuf);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
}

/* ------------------------------------------------------------------------ */
/* context                                                                   */

typedef struct rank_file {
    st_writer *w;
    uint32_t crc; /* raw register, starts at ~0 */
    uint64_t bytes, read, file_bytes;
    /* A second descriptor on the writer's "<path>.tmp" (its documented temp
     * name) used only to start writeback early, so that the writer's final
     * fsync finds little left to flush. -1 when unavailable. */
    int sync_fd;
    uint64_t unsynced;
    bool failed;
    mp_error err;
} rank_file;

typedef struct part_plan {
    size_t first, count; /* range of layout targets */
    uint64_t bytes;
} part_plan;

typedef struct shard_ctx {
    const shard_opts *o;
    tp_model_cfg cfg;
    mp_weights *w;
    /* Source files mapped read-only (NULL where mmap failed: pread then),
     * so that a chunk is a pointer into the page cache, not a copy. */
    const unsigned char **maps;
    uint64_t *map_len;
    tp_layout lay;
    part_plan *parts;
    size_t nparts;
    char *tmp_dir;
    unsigned char *buf; /* a whole strided view, materialized */
    size_t buf_cap;
    tp_slice *sl;         /* tp slices of the current piece */
    rank_file *rf;        /* one per rank of the current group */
    int r0, r1;           /* the current group */
    const mp_tensor *cur; /* the piece being streamed */
    size_t cur_part;      /* the part being finished or checked */
    uint64_t done, total, bytes_read, bytes_written;
    json_t *files;         /* per rank: array of {name, bytes, crc32c} */
    json_t *state;         /* resume checkpoint being built (owned) */
    const json_t *resumed; /* "files" of the checkpoint resumed from, or NULL */
    uint64_t source_bytes;
    size_t files_resumed;
    crc32c_tab crc;
    pool pool;
} shard_ctx;

static void say(shard_ctx *c, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(shard_ctx *c, const char *level, const char *fmt, ...) {
    if (!c->o->log) return;
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->o->log(c->o->cb, level, msg);
}

static bool cancelled(shard_ctx *c) {
    return c->o->cancelled && c->o->cancelled(c->o->cb);
}

static int grow(unsigned char **b, size_t *cap, uint64_t need, mp_error *err) {
    if (need <= *cap) return 0;
    if (need > SIZE_MAX / 2)
        return mp_err(err, "too_large", "buffer of %llu bytes", (unsigned long long)need);
    unsigned char *n = realloc(*b, (size_t)need);
    if (!n) return mp_err(err, "no_memory", "out of memory (%llu bytes)", (unsigned long long)need);
    *b = n;
    *cap = (size_t)need;
    return 0;
}

static int rank_write(const shard_ctx *c, rank_file *f, const void *p, size_t n, mp_error *err) {
    /* Checksum and write in cache-sized steps: the write then copies bytes
     * the checksum just pulled into the cache instead of reading memory
     * twice. */
    for (size_t o = 0; o < n;) {
        size_t k = n - o < SHARD_STEP ? n - o : SHARD_STEP;
        f->crc = crc32c_update(&c->crc, f->crc, (const unsigned char *)p + o, k);
        if (st_writer_write(f->w, (const unsigned char *)p + o, k, err) != 0) return -1;
        o += k;
    }
    f->bytes += n;
    f->unsynced += n;
    if (f->sync_fd >= 0 && f->unsynced >= SHARD_WRITEBACK) {
        /* Advisory: failure only means the final fsync does more work. */
        (void)sync_file_range(f->sync_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        f->unsynced = 0;
    }
    return 0;
}

static int rank_zeros(const shard_ctx *c, rank_file *f, worker_buf *wb, uint64_t n, mp_error *err) {
    if (grow(&wb->gbuf, &wb->gcap, SHARD_STEP, err) != 0) return -1;
    memset(wb->gbuf, 0, SHARD_STEP);
    while (n > 0) {
        size_t k = n < SHARD_STEP ? (size_t)n : SHARD_STEP;
        if (rank_write(c, f, wb->gbuf, k, err) != 0) return -1;
        n -= k;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* streaming one source tensor's slice to one rank                           */

/* The source bytes [off, off + n) of t: a pointer into the file's map, or
 * read into the worker's buffer. */
static const unsigned char *read_at(const shard_ctx *c, rank_file *f, worker_buf *wb,
                                    const mp_tensor *t, size_t n, uint64_t off, mp_error *err) {
    f->read += n;
    const unsigned char *m = c->maps ? c->maps[t->file_index] : NULL;
    if (m && t->data_offset + off + n <= c->map_len[t->file_index]) return m + t->data_offset + off;
    if (grow(&wb->rbuf, &wb->rcap, n, err) != 0) return NULL;
    if (weights_pread(c->w->fds[t->file_index], wb->rbuf, n, t->data_offset + off, err) != 0)
        return NULL;
    return wb->rbuf;
}

/* Done with source bytes [off, off + n) of t: drop them from our mapping so
 * that the resident set stays a few chunks, not the model (the pages stay
 * in the page cache; a rank that still needs them faults them back in). */
static void release_at(const shard_ctx *c, const mp_tensor *t, size_t n, uint64_t off) {
    const unsigned char *m = c->maps ? c->maps[t->file_index] : NULL;
    if (!m || t->data_offset + off + n > c->map_len[t->file_index]) return;
    uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)(m + t->data_offset + off) & ~(pg - 1);
    uintptr_t b = (uintptr_t)(m + t->data_offset + off + n);
    (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

static int stream_rank(const shard_ctx *c, const mp_tensor *t, const tp_slice *s, rank_file *f,
                       worker_buf *wb, mp_error *err) {
    if (s->dim < 0) { /* replicated: the whole tensor */
        for (uint64_t off = 0; off < t->nbytes;) {
            size_t n = t->nbytes - off < SHARD_CHUNK ? (size_t)(t->nbytes - off) : SHARD_CHUNK;
            const unsigned char *b = read_at(c, f, wb, t, n, off, err);
            if (!b || rank_write(c, f, b, n, err) != 0) return -1;
            release_at(c, t, n, off);
            off += n;
        }
        return 0;
    }
    uint64_t inner, outer = 1;
    for (int d = 0; d < s->dim; d++)
        outer *= (uint64_t)t->shape[d];
    if (!mp_tensor_bytes(t->dtype, t->shape + s->dim + 1, t->ndim - s->dim - 1, &inner))
        return mp_err(err, "unsplittable", "slice rows are not whole bytes");
    if (outer == 1) {
        /* Split along the outermost dim: each segment is one byte range. */
        for (int g = 0; g < s->nseg; g++) {
            uint64_t len = inner * (uint64_t)s->seg[g].len;
            if (s->seg[g].start < 0) {
                if (rank_zeros(c, f, wb, len, err) != 0) return -1;
                continue;
            }
            uint64_t from = inner * (uint64_t)s->seg[g].start;
            for (uint64_t off = from; off < from + len;) {
                size_t n =
                    from + len - off < SHARD_CHUNK ? (size_t)(from + len - off) : SHARD_CHUNK;
                const unsigned char *b = read_at(c, f, wb, t, n, off, err);
                if (!b || rank_write(c, f, b, n, err) != 0) return -1;
                release_at(c, t, n, off);
                off += n;
            }
        }
        return 0;
    }
    /* Split along an inner dim (row-parallel [N, K] -> [N, K/tp]): whole
     * outer rows in chunks; this rank takes its columns of them. */
    uint64_t row = inner * (uint64_t)t->shape[s->dim];
    uint64_t per_row = inner * (uint64_t)s->shape[s->dim];
    if (row == 0 || per_row == 0) return 0;
    uint64_t rows_per = SHARD_CHUNK / row ? SHARD_CHUNK / row : 1;
    if (grow(&wb->gbuf, &wb->gcap, rows_per * per_row, err) != 0) return -1;
    for (uint64_t i = 0; i < outer;) {
        uint64_t k = outer - i < rows_per ? outer - i : rows_per;
        const unsigned char *buf = read_at(c, f, wb, t, (size_t)(k * row), i * row, err);
        if (!buf) return -1;
        unsigned char *o = wb->gbuf;
        for (uint64_t j = 0; j < k; j++)
            for (int g = 0; g < s->nseg; g++) {
                uint64_t n = inner * (uint64_t)s->seg[g].len;
                if (s->seg[g].start < 0)
                    memset(o, 0, n);
                else
                    memcpy(o, buf + j * row + inner * (uint64_t)s->seg[g].start, n);
                o += n;
            }
        if (rank_write(c, f, wb->gbuf, (size_t)(k * per_row), err) != 0) return -1;
        release_at(c, t, (size_t)(k * row), i * row);
        i += k;
    }
    return 0;
}

/* Pool job: rank item of the current group streams its slice of c->cur.
 * Strided views (c->buf holds the materialized tensor) are gathered. */
static void job_stream(void *arg, int item, worker_buf *wb) {
    shard_ctx *c = arg;
    rank_file *f = &c->rf[item];
    if (f->failed) return;
    const tp_slice *s = &c->sl[c->r0 + item];
    const mp_tensor *t = c->cur;
    int rc;
    if (c->buf && (t->is_view || t->data_bytes != t->nbytes)) {
        rc = grow(&wb->gbuf, &wb->gcap, s->bytes, &f->err);
        if (rc == 0) rc = tp_slice_gather(t, s, c->buf, wb->gbuf, &f->err);
        if (rc == 0) rc = rank_write(c, f, wb->gbuf, s->bytes, &f->err);
    } else {
        rc = stream_rank(c, t, s, f, wb, &f->err);
    }
    if (rc != 0) f->failed = true;
}

static int stream_piece(shard_ctx *c, const mp_tensor *t, mp_error *err) {
    for (int r = c->r0; r < c->r1; r++)
        if (tp_slice_for(&c->cfg, t, c->o->tp, r, c->o->naming, &c->sl[r], err) != 0) return -1;
    bool contiguous = !t->is_view && t->data_bytes == t->nbytes;
    if (!contiguous) {
        /* Views: materialize the tensor once, then every rank gathers. */
        if (grow(&c->buf, &c->buf_cap, t->nbytes, err) != 0) return -1;
        if (weights_read(c->w, t, c->buf, err) != 0) return -1;
        c->bytes_read += t->nbytes;
    }
    c->cur = t;
    pool_run(&c->pool, job_stream, c, c->r1 - c->r0);
    c->cur = NULL;
    for (int i = 0; i < c->r1 - c->r0; i++)
        if (c->rf[i].failed) {
            *err = c->rf[i].err;
            return -1;
        }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* parts                                                                     */

static int plan_parts(shard_ctx *c, mp_error *err) {
    uint64_t max = c->o->max_part_bytes ? c->o->max_part_bytes : SHARD_DEFAULT_PART_BYTES;
    c->parts = calloc(c->lay.ntargets ? c->lay.ntargets : 1, sizeof *c->parts);
    if (!c->parts) return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < c->lay.ntargets; i++) {
        uint64_t b = c->lay.targets[i].bytes;
        part_plan *p = c->nparts ? &c->parts[c->nparts - 1] : NULL;
        /* A tensor larger than max gets a part of its own; unlike SGLang's
         * save_model we never leave an empty part behind. */
        if (!p || (p->count && p->bytes + b > max)) {
            p = &c->parts[c->nparts++];
            p->first = i;
        }
        p->count++;
        p->bytes += b;
    }
    return 0;
}

static int part_path(const shard_ctx *c, int rank, size_t part, char *out, size_t n) {
    return snprintf(out, n, "%s/model-rank-%d-part-%zu.safetensors", c->tmp_dir, rank, part) <
                   (int)n
               ? 0
               : -1;
}

/* Pool job: close (fsync, rename) rank item's file of the current part. */
static void job_finish(void *arg, int item, worker_buf *wb) {
    (void)wb;
    shard_ctx *c = arg;
    rank_file *f = &c->rf[item];
    if (f->sync_fd >= 0) close(f->sync_fd);
    f->sync_fd = -1;
    f->file_bytes = 8 + st_writer_header_len(f->w) + st_writer_data_bytes(f->w);
    if (st_writer_finish(f->w, &f->err) != 0) f->failed = true;
    f->w = NULL;
}

static int write_part(shard_ctx *c, size_t pi, mp_error *err) {
    const part_plan *p = &c->parts[pi];
    int r0 = c->r0, r1 = c->r1;
    st_wtensor *wt = calloc(p->count ? p->count : 1, sizeof *wt);
    if (!wt) return mp_err(err, "no_memory", "out of memory");
    for (size_t k = 0; k < p->count; k++) {
        const tp_target *tg = &c->lay.targets[p->first + k];
        wt[k].name = tg->name;
        wt[k].dtype = tg->dtype;
        wt[k].ndim = tg->ndim;
        memcpy(wt[k].shape, tg->shape, sizeof wt[k].shape);
    }
    int rc = -1;
    int opened = 0;
    json_t *meta = json_pack("{s:s}", "format", "pt");
    for (int r = r0; r < r1; r++) {
        char path[PATH_MAX];
        if (part_path(c, r, pi, path, sizeof path) != 0) {
            mp_err(err, "bad_output", "output path too long");
            goto out;
        }
        rank_file *f = &c->rf[r - r0];
        memset(f, 0, sizeof *f);
        f->crc = ~0u;
        f->sync_fd = -1;
        if (st_writer_open(path, wt, p->count, meta, &f->w, err) != 0) goto out;
        opened++;
        char tmp[PATH_MAX + 8];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        f->sync_fd = open(tmp, O_WRONLY | O_CLOEXEC);
    }
    /* Every rank's writer sorts the same names, dtypes and shapes: one order. */
    for (size_t k = 0; k < p->count; k++) {
        const tp_target *tg = &c->lay.targets[p->first + st_writer_order(c->rf[0].w, k)];
        for (size_t q = 0; q < tg->npieces; q++) {
            const mp_tensor *t = &c->w->tensors[tg->pieces[q]];
            if (c->o->progress) c->o->progress(c->o->cb, c->done, c->total, t->name);
            if (stream_piece(c, t, err) != 0) {
                if (strcmp(err->code, "cancelled") != 0 && !strstr(err->message, t->name))
                    mp_err_wrap(err, NULL, "%s", t->name);
                goto out;
            }
            c->done += t->nbytes;
            if (cancelled(c)) {
                mp_err(err, "cancelled", "cancelled");
                goto out;
            }
        }
    }
    rc = 0;
out:
    if (rc == 0) {
        pool_run(&c->pool, job_finish, c, opened);
        for (int i = 0; i < opened; i++) {
            rank_file *f = &c->rf[i];
            c->bytes_read += f->read;
            c->bytes_written += f->bytes;
            if (f->failed) {
                if (rc == 0) *err = f->err;
                rc = -1;
                continue;
            }
            char path[PATH_MAX];
            part_path(c, r0 + i, pi, path, sizeof path);
            json_array_append_new(json_array_get(c->files, (size_t)(r0 + i)),
                                  json_pack("{s:s,s:I,s:I}", "name", strrchr(path, '/') + 1,
                                            "bytes", (json_int_t)f->file_bytes, "crc32c",
                                            (json_int_t)(uint32_t)~f->crc));
        }
    } else {
        for (int i = 0; i < opened; i++) {
            rank_file *f = &c->rf[i];
            if (f->sync_fd >= 0) close(f->sync_fd);
            f->sync_fd = -1;
            st_writer_abort(f->w);
            f->w = NULL;
        }
    }
    json_decref(meta);
    free(wt);
    return rc;
}

/* Re-reads one written file: the tensor table must be the part's targets
 * and the data section's CRC-32C the one computed while writing. */
static int verify_file(const shard_ctx *c, int rank, size_t pi, uint32_t want_crc, worker_buf *wb,
                       mp_error *err) {
    char path[PATH_MAX];
    part_path(c, rank, pi, path, sizeof path);
    mp_weights w = {0};
    if (st_open(path, &w, err) != 0) {
        return mp_err_wrap(err, "verify_failed", "re-reading %s", path);
    }
    const part_plan *p = &c->parts[pi];
    int rc = 0;
    if (w.ntensors != p->count)
        rc = mp_err(err, "verify_failed", "%s: %zu tensors, meant %zu", path, w.ntensors, p->count);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t i = 0; rc == 0 && i < w.ntensors; i++) {
        const mp_tensor *t = &w.tensors[i];
        const tp_target *tg = NULL;
        for (size_t k = 0; k < p->count && !tg; k++)
            if (strcmp(c->lay.targets[p->first + k].name, t->name) == 0)
                tg = &c->lay.targets[p->first + k];
        if (!tg || tg->dtype != t->dtype || tg->ndim != t->ndim ||
            memcmp(tg->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim) != 0 ||
            tg->bytes != t->nbytes)
            rc = mp_err(err, "verify_failed", "%s: tensor %s is not what was written", path,
                        t->name);
        if (t->nbytes && t->data_offset < lo) lo = t->data_offset;
        if (t->nbytes && t->data_offset + t->data_bytes > hi) hi = t->data_offset + t->data_bytes;
    }
    uint32_t crc = ~0u;
    void *map = MAP_FAILED;
    if (rc == 0 && lo < hi) map = mmap(NULL, (size_t)hi, PROT_READ, MAP_SHARED, w.fds[0], 0);
    if (map != MAP_FAILED) {
        (void)madvise(map, (size_t)hi, MADV_SEQUENTIAL);
        const unsigned char *m = map;
        uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
        for (uint64_t off = lo; off < hi;) {
            /* windows dropped as they are done: the resident set stays small */
            uint64_t end = (off | (SHARD_CHUNK - 1)) + 1 < hi ? (off | (SHARD_CHUNK - 1)) + 1 : hi;
            crc = crc32c_update(&c->crc, crc, m + off, (size_t)(end - off));
            uintptr_t a = (uintptr_t)(m + off) & ~(pg - 1);
            (void)madvise((void *)a, (uintptr_t)(m + end) - a, MADV_DONTNEED);
            off = end;
        }
        munmap(map, (size_t)hi);
    } else if (rc == 0 && lo < hi) {
        if (grow(&wb->rbuf, &wb->rcap, SHARD_CHUNK, err) != 0) rc = -1;
        for (uint64_t off = lo; rc == 0 && off < hi;) {
            size_t n = hi - off < SHARD_CHUNK ? (size_t)(hi - off) : SHARD_CHUNK;
            if (weights_pread(w.fds[0], wb->rbuf, n, off, err) != 0) {
                rc = -1;
                break;
            }
            crc = crc32c_update(&c->crc, crc, wb->rbuf, n);
            off += n;
        }
    }
    if (rc == 0 && ~crc != want_crc)
        rc =
            mp_err(err, "verify_failed", "%s: data CRC-32C %08x, wrote %08x", path, ~crc, want_crc);
    weights_free_fields(&w);
    return rc;
}

/* Pool job: check rank item's file of the current group and part. */
static void job_verify(void *arg, int item, worker_buf *wb) {
    shard_ctx *c = arg;
    rank_file *f = &c->rf[item];
    if (f->failed) return;
    json_t *jf = json_array_get(json_array_get(c->files, (size_t)(c->r0 + item)), c->cur_part);
    uint32_t crc = (uint32_t)json_integer_value(json_object_get(jf, "crc32c"));
    if (verify_file(c, c->r0 + item, c->cur_part, crc, wb, &f->err) != 0) f->failed = true;
}

static int verify_part(shard_ctx *c, size_t pi, mp_error *err) {
    for (int i = 0; i < c->r1 - c->r0; i++)
        c->rf[i].failed = false;
    c->cur_part = pi;
    pool_run(&c->pool, job_verify, c, c->r1 - c->r0);
    for (int i = 0; i < c->r1 - c->r0; i++)
        if (c->rf[i].failed) {
            *err = c->rf[i].err;
            return -1;
        }
    return 0;
}

static uint64_t part_source_bytes(const shard_ctx *c, size_t pi) {
    uint64_t b = 0;
    for (size_t k = 0; k < c->parts[pi].count; k++) {
        const tp_target *tg = &c->lay.targets[c->parts[pi].first + k];
        for (size_t q = 0; q < tg->npieces; q++)
            b += c->w->tensors[tg->pieces[q]].nbytes;
    }
    return b;
}

/* A part the interrupted run finished for every rank of this group: take
 * its files over if they still check out. */
static bool resume_part(shard_ctx *c, size_t pi) {
    if (!c->resumed) return false;
    for (int r = c->r0; r < c->r1; r++) {
        char path[PATH_MAX];
        part_path(c, r, pi, path, sizeof path);
        json_t *e = json_object_get(c->resumed, strrchr(path, '/') + 1);
        if (!json_is_integer(json_object_get(e, "crc32c"))) return false;
    }
    for (int r = c->r0; r < c->r1; r++) {
        char path[PATH_MAX];
        part_path(c, r, pi, path, sizeof path);
        const char *name = strrchr(path, '/') + 1;
        json_t *e = json_object_get(c->resumed, name);
        json_array_append_new(json_array_get(c->files, (size_t)r),
                              json_pack("{s:s,s:O,s:O}", "name", name, "bytes",
                                        json_object_get(e, "bytes"), "crc32c",
                                        json_object_get(e, "crc32c")));
    }
    mp_error e2 = {0};
    if (verify_part(c, pi, &e2) == 0) return true;
    say(c, "warn", "part %zu of the interrupted run does not check out (%s); writing it again", pi,
        e2.message);
    for (int r = c->r0; r < c->r1; r++) {
        json_t *fl = json_array_get(c->files, (size_t)r);
        json_array_remove(fl, json_array_size(fl) - 1);
    }
    return false;
}

/* Records the files of part pi (this group) as done, for a resumed run. */
static void save_checkpoint(shard_ctx *c, size_t pi) {
    json_t *files = json_object_get(c->state, "files");
    for (int r = c->r0; r < c->r1; r++) {
        json_t *jf = json_array_get(json_array_get(c->files, (size_t)r), pi);
        json_object_set_new(files, json_string_value(json_object_get(jf, "name")),
                            json_pack("{s:O,s:O}", "bytes", json_object_get(jf, "bytes"), "crc32c",
                                      json_object_get(jf, "crc32c")));
    }
    if (c->o->checkpoint) c->o->checkpoint(c->o->cb, json_deep_copy(c->state));
}

/* ------------------------------------------------------------------------ */
/* files around the weights                                                  */

static bool is_side_file(const char *n) {
    static const char *const exact[] = {"config.json",
                                        "generation_config.json",
                                        "special_tokens_map.json",
                                        "added_tokens.json",
                                        "merges.txt",
                                        "vocab.json",
                                        "vocab.txt",
                                        "chat_template.json",
                                        "chat_template.jinja",
                                        "preprocessor_config.json",
                                        NULL};
    for (int i = 0; exact[i]; i++)
        if (strcmp(n, exact[i]) == 0) return true;
    return strncmp(n, "tokenizer", 9) == 0;
}

static int copy_side_files(shard_ctx *c, json_t *copied, mp_error *err) {
    DIR *d = opendir(c->o->model_dir);
    if (!d) return mp_err(err, "io_error", "%s: %s", c->o->model_dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.' || !is_side_file(e->d_name)) continue;
        char src[PATH_MAX], dst[PATH_MAX];
        if (snprintf(src, sizeof src, "%s/%s", c->o->model_dir, e->d_name) >= (int)sizeof src ||
            snprintf(dst, sizeof dst, "%s/%s", c->tmp_dir, e->d_name) >= (int)sizeof dst)
            continue;
        struct stat st;
        if (stat(src, &st) != 0 || !S_ISREG(st.st_mode)) continue; /* follows hub symlinks */
        char *data = NULL;
        size_t len = 0;
        if (fs_read_all(src, SHARD_MAX_COPY, &data, &len, err) != 0 ||
            fs_write_atomic(dst, data, len, err) != 0)
            rc = -1;
        else
            json_array_append_new(copied, json_string(e->d_name));
        free(data);
    }
    closedir(d);
    return rc;
}

/* Removes a folder we made (flat: only files in it). */
static void rm_flat(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) < (int)sizeof p) unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static json_t *rules_used(const shard_ctx *c) {
    /* Which rule each kept source tensor went through, counted. */
    json_t *arr = json_array();
    const tp_rule **seen = calloc(c->w->ntensors ? c->w->ntensors : 1, sizeof *seen);
    size_t *cnt = calloc(c->w->ntensors ? c->w->ntensors : 1, sizeof *cnt);
    size_t ns = 0;
    for (size_t i = 0; seen && cnt && i < c->w->ntensors; i++) {
        const tp_rule *r = tp_rule_for(&c->cfg, c->w->tensors[i].name);
        size_t k = 0;
        while (k < ns && seen[k] != r)
            k++;
        if (k == ns) seen[ns++] = r;
        cnt[k]++;
    }
    for (size_t k = 0; seen && cnt && k < ns; k++)
        if (seen[k])
            json_array_append_new(arr, json_pack("{s:s,s:s,s:s?,s:I}", "pattern", seen[k]->pattern,
                                                 "kind", tp_kind_name(seen[k]->kind), "target",
                                                 seen[k]->target, "tensors", (json_int_t)cnt[k]));
    free(seen);
    free(cnt);
    return arr;
}

static const char *commit_of(const char *dir) {
    const char *b = strrchr(dir, '/');
    b = b ? b + 1 : dir;
    if (strlen(b) != 40) return NULL;
    for (const char *p = b; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return NULL;
    return b;
}

/* The checkpoint of a model folder: what weights_open finds (a safetensors
 * index or files, a PyTorch index), else a single PyTorch file (what
 * SGLang's loader would use, training leftovers ignored). */
static int open_source(const char *dir, mp_weights **w, mp_error *err) {
    if (weights_open(dir, w, err) == 0) return 0;
    if (!err || strcmp(err->code, "not_found") != 0) return -1;
    static const char *const skip[] = {"training_args.bin",
                                       "optimizer.bin",
                                       "optimizer.pt",
                                       "scheduler.pt",
                                       "scaler.pt",
                                       "rng_state.pth",
                                       NULL};
    DIR *d = opendir(dir);
    if (!d) return -1;
    char *pick = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' || !((l > 4 && strcmp(e->d_name + l - 4, ".bin") == 0) ||
                                     (l > 3 && strcmp(e->d_name + l - 3, ".pt") == 0) ||
                                     (l > 4 && strcmp(e->d_name + l - 4, ".pth") == 0)))
            continue;
        bool skipped = false;
        for (int i = 0; skip[i]; i++)
            if (strcmp(e->d_name, skip[i]) == 0) skipped = true;
        if (skipped) continue;
        n++;
        if (!pick || strcmp(e->d_name, "pytorch_model.bin") == 0) {
            free(pick);
            pick = strdup(e->d_name);
        }
    }
    closedir(d);
    int rc = -1;
    if (!pick)
        rc = mp_err(err, "not_found", "%s: no weight files (safetensors or PyTorch)", dir);
    else if (n > 1 && strcmp(pick, "pytorch_model.bin") != 0)
        rc = mp_err(err, "not_found", "%s: %d PyTorch files and no index to say which", dir, n);
    else {
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", dir, pick) >= (int)sizeof path)
            rc = mp_err(err, "bad_path", "path too long");
        else
            rc = weights_open(path, w, err);
    }
    free(pick);
    return rc;
}

/* Maps every source file (best effort: a file that cannot be mapped is
 * read with pread). */
static void map_sources(shard_ctx *c) {
    c->maps = calloc(c->w->nfiles ? c->w->nfiles : 1, sizeof *c->maps);
    c->map_len = calloc(c->w->nfiles ? c->w->nfiles : 1, sizeof *c->map_len);
    if (!c->maps || !c->map_len) {
        free(c->maps);
        free(c->map_len);
        c->maps = NULL;
        c->map_len = NULL;
        return;
    }
    for (uint32_t i = 0; i < c->w->nfiles; i++) {
        struct stat st;
        if (fstat(c->w->fds[i], &st) != 0 || st.st_size <= 0 || (uint64_t)st.st_size > SIZE_MAX)
            continue;
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, c->w->fds[i], 0);
        if (m == MAP_FAILED) continue;
        c->maps[i] = m;
        c->map_len[i] = (uint64_t)st.st_size;
    }
}

static void unmap_sources(shard_ctx *c) {
    for (uint32_t i = 0; c->maps && i < c->w->nfiles; i++)
        if (c->maps[i]) munmap((void *)c->maps[i], (size_t)c->map_len[i]);
    free(c->maps);
    free(c->map_len);
    c->maps = NULL;
}

static bool plain_tag(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 48) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-'))
            return false;
    return true;
}

/* The checkpoint is from a run of this same job: same temp folder, split
 * and source size. */
static bool resume_matches(const shard_ctx *c, const json_t *r) {
    const json_t *s = c->state;
    if (!json_is_object(r) || !json_is_object(json_object_get(r, "files"))) return false;
    const char *keys[] = {"version", "tmp_dir", "tp", "naming", "max_part_bytes", "source_bytes"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if (!json_equal(json_object_get(r, keys[i]), json_object_get(s, keys[i]))) return false;
    return true;
}

/* ------------------------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *naming_name(tp_naming n) {
    return n == TP_NAMING_HF ? "hf" : "sglang";
}

static uint64_t part_limit(const shard_opts *o) {
    return o->max_part_bytes ? o->max_part_bytes : SHARD_DEFAULT_PART_BYTES;
}

/* How many ranks are written together (one pass over the source each). */
static int rank_group(const shard_opts *o) {
    return o->tp < SHARD_RANK_GROUP ? o->tp : SHARD_RANK_GROUP;
}

/* Opens the checkpoint, lays its tensors out over the ranks and cuts each
 * rank's targets into parts. */
static int shard_plan(shard_ctx *c, mp_error *err) {
    const shard_opts *o = c->o;
    if (tp_config_load(o->model_dir, &c->cfg, err) != 0) return -1;
    if (tp_check(&c->cfg, o->tp, err) != 0) return -1;
    struct stat st;
    if (!o->overwrite && lstat(o->output_dir, &st) == 0)
        return mp_err(err, "output_exists",
                      "%s already exists (set params.overwrite to replace it)", o->output_dir);
    if (open_source(o->model_dir, &c->w, err) != 0) return -1;
    map_sources(c);
    if (tp_layout_build(&c->cfg, c->w->tensors, c->w->ntensors, o->tp, o->naming, &c->lay, err) !=
        0)
        return -1;
    if (c->lay.ntargets == 0)
        return mp_err(err, "not_found", "no tensors to shard in %s", o->model_dir);
    if (plan_parts(c, err) != 0) return -1;
    for (size_t i = 0; i < c->w->ntensors; i++)
        c->total += c->w->tensors[i].nbytes;
    c->source_bytes = c->total;
    /* Each group of ranks reads the whole source once. */
    int group = rank_group(o);
    c->total *= (uint64_t)((o->tp + group - 1) / group);
    return 0;
}

/* The per-run buffers, the per-rank file lists and the temp folder's name,
 * "<output>.tmp-<tag>" (the job's tag, so that a resumed run finds it). */
static int shard_alloc(shard_ctx *c, mp_error *err) {
    const shard_opts *o = c->o;
    c->sl = calloc((size_t)o->tp, sizeof *c->sl);
    c->rf = calloc((size_t)rank_group(o), sizeof *c->rf);
    c->files = json_array();
    char tag[64];
    if (o->tmp_tag && plain_tag(o->tmp_tag))
        snprintf(tag, sizeof tag, "%s", o->tmp_tag);
    else
        snprintf(tag, sizeof tag, "%ld", (long)getpid());
    if (!c->sl || !c->rf || !c->files ||
        asprintf(&c->tmp_dir, "%s.tmp-%s", o->output_dir, tag) < 0) {
        c->tmp_dir = NULL;
        return mp_err(err, "no_memory", "out of memory");
    }
    for (int r = 0; r < o->tp; r++)
        json_array_append_new(c->files, json_array());
    return 0;
}

static int shard_start_pool(shard_ctx *c, mp_error *err) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nt = (int)(ncpu < 1 ? 1 : ncpu > SHARD_MAX_THREADS + 1 ? SHARD_MAX_THREADS + 1 : ncpu);
    if (nt > rank_group(c->o)) nt = rank_group(c->o);
    /* nt - 1 workers: the calling thread is one of them */
    if (pool_start(&c->pool, nt - 1) != 0)
        return mp_err(err, "no_memory", "cannot start the worker pool");
    return 0;
}

static int make_parent_dir(const char *path, mp_error *err) {
    char *parent = strdup(path);
    char *sl = parent ? strrchr(parent, '/') : NULL;
    if (sl && sl != parent) *sl = 0;
    int prc = parent ? fs_mkdirs(parent, err) : mp_err(err, "no_memory", "out of memory");
    free(parent);
    return prc;
}

/* Starts the resume checkpoint and the temp folder: the interrupted run's
 * when the checkpoint given is of this same job, else a fresh one. */
static int shard_open_tmp(shard_ctx *c, mp_error *err) {
    const shard_opts *o = c->o;
    c->state =
        json_pack("{s:i,s:s,s:i,s:s,s:I,s:I,s:{}}", "version", 1, "tmp_dir", c->tmp_dir, "tp",
                  o->tp, "naming", naming_name(o->naming), "max_part_bytes",
                  (json_int_t)part_limit(o), "source_bytes", (json_int_t)c->source_bytes, "files");
    if (!c->state) return mp_err(err, "no_memory", "out of memory");
    struct stat st;
    if (resume_matches(c, o->resume) && stat(c->tmp_dir, &st) == 0 && S_ISDIR(st.st_mode)) {
        c->resumed = json_object_get(o->resume, "files");
        say(c, "info", "resuming in %s (%zu files done before)", c->tmp_dir,
            json_object_size(c->resumed));
        return 0;
    }
    rm_flat(c->tmp_dir); /* leftovers of an earlier run under the same tag */
    if (mkdir(c->tmp_dir, 0755) != 0)
        return mp_err(err, "io_error", "mkdir %s: %s", c->tmp_dir, strerror(errno));
    return 0;
}

/* Every part of every rank, one group of ranks at a time: each part is
 * taken over from the interrupted run, or written, re-read and recorded in
 * the checkpoint. */
static int shard_write_groups(shard_ctx *c, mp_error *err) {
    const shard_opts *o = c->o;
    int group = rank_group(o);
    for (c->r0 = 0; c->r0 < o->tp; c->r0 += group) {
        c->r1 = c->r0 + group < o->tp ? c->r0 + group : o->tp;
        for (size_t p = 0; p < c->nparts; p++) {
            if (resume_part(c, p)) {
                c->done += part_source_bytes(c, p);
                c->files_resumed += (size_t)(c->r1 - c->r0);
                say(c, "info", "ranks %d..%d part %zu: taken over from the interrupted run", c->r0,
                    c->r1 - 1, p);
                continue;
            }
            if (write_part(c, p, err) != 0) return -1;
            /* Re-read what was just written, then record it as done. */
            if (o->progress) o->progress(o->cb, c->done, c->total, "checking");
            if (verify_part(c, p, err) != 0) return -1;
            save_checkpoint(c, p);
            if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
        }
    }
    return 0;
}

/* Per rank: {rank, files, bytes}. */
static json_t *rank_summary(const shard_ctx *c) {
    json_t *ranks = json_array();
    for (int r = 0; r < c->o->tp; r++) {
        json_t *fl = json_array_get(c->files, (size_t)r);
        json_int_t b = 0;
        size_t i;
        json_t *f;
        json_array_foreach(fl, i, f) b += json_integer_value(json_object_get(f, "bytes"));
        json_array_append_new(ranks,
                              json_pack("{s:i,s:O,s:I}", "rank", r, "files", fl, "bytes", b));
    }
    return ranks;
}

/* SHARD_MANIFEST in the temp folder, so that it is published with the
 * weights. */
static int shard_write_manifest(const shard_ctx *c, json_t *copied, json_t *ranks, mp_error *err) {
    const shard_opts *o = c->o;
    const char *commit = commit_of(o->model_dir);
    json_t *manifest = json_pack(
        "{s:s,s:i,s:i,s:s,s:s,s:I,s:{s:s?,s:s?,s:s?,s:s},s:s,s:s,s:o,s:O,s:I,s:O,s:I}", "format",
        "sglang-sharded-state", "version", 1, "tp_size", o->tp, "naming", naming_name(o->naming),
        "pattern", SHARD_PATTERN, "max_part_bytes", (json_int_t)part_limit(o), "source", "model",
        o->source_model, "revision", o->source_revision, "commit", commit, "path", o->model_dir,
        "architecture", c->cfg.architecture, "model_type", c->cfg.model_type, "rules",
        rules_used(c), "ranks", ranks, "parts", (json_int_t)c->nparts, "copied_files", copied,
        "rank_bytes", (json_int_t)c->lay.rank_bytes);
    if (!manifest) return mp_err(err, "no_memory", "out of memory");
    char *txt = json_dumps(manifest, JSON_INDENT(2) | JSON_SORT_KEYS);
    char mp[PATH_MAX];
    snprintf(mp, sizeof mp, "%s/%s", c->tmp_dir, SHARD_MANIFEST);
    int wrc = txt ? fs_write_atomic(mp, txt, strlen(txt), err)
                  : mp_err(err, "no_memory", "out of memory");
    free(txt);
    json_decref(manifest);
    return wrc;
}

/* Publish: the finished folder replaces the name in one rename (a folder
 * already there, with overwrite, is moved aside first and removed after). */
static int shard_publish(const shard_ctx *c, mp_error *err) {
    const shard_opts *o = c->o;
    char *old = NULL;
    struct stat st;
    if (lstat(o->output_dir, &st) == 0) {
        if (!o->overwrite)
            return mp_err(err, "output_exists", "%s appeared while sharding", o->output_dir);
        if (asprintf(&old, "%s.old-%ld", o->output_dir, (long)getpid()) < 0 ||
            rename(o->output_dir, old) != 0) {
            mp_err(err, "io_error", "moving the old %s aside: %s", o->output_dir, strerror(errno));
            free(old);
            return -1;
        }
    }
    if (rename(c->tmp_dir, o->output_dir) != 0) {
        mp_err(err, "io_error", "rename %s: %s", c->tmp_dir, strerror(errno));
        if (old) rename(old, o->output_dir);
        free(old);
        return -1;
    }
    if (old) {
        rm_flat(old);
        free(old);
    }
    return fs_sync_parent(o->output_dir, err);
}

/* The job's result; takes ranks over. */
static int shard_result(const shard_ctx *c, json_t *ranks, double t0, json_t **result,
                        mp_error *err) {
    const shard_opts *o = c->o;
    char mpath[PATH_MAX];
    snprintf(mpath, sizeof mpath, "%s/%s", o->output_dir, SHARD_MANIFEST);
    *result = json_pack("{s:s,s:s,s:i,s:s,s:I,s:o,s:I,s:I,s:I,s:f}", "output_path", o->output_dir,
                        "manifest", mpath, "tp_size", o->tp, "naming", naming_name(o->naming),
                        "parts", (json_int_t)c->nparts, "ranks", ranks, "rank_bytes",
                        (json_int_t)c->lay.rank_bytes, "bytes_read", (json_int_t)c->bytes_read,
                        "bytes_written", (json_int_t)c->bytes_written, "seconds", now_s() - t0);
    if (*result)
        json_object_set_new(*result, "files_resumed", json_integer((json_int_t)c->files_resumed));
    if (!*result) return mp_err(err, "no_memory", "out of memory");
    return 0;
}

int shard_run(const shard_opts *o, json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    shard_ctx c = {.o = o};
    crc32c_init(&c.crc);
    int rc = -1;
    bool made_tmp = false, pool_up = false;
    json_t *copied = json_array(), *ranks = NULL;
    if (o->tp < 1 || o->tp > 1024) {
        json_decref(copied);
        return mp_err(err, "bad_tp_size", "tp_size must be 1..1024");
    }
    if (shard_plan(&c, err) != 0 || shard_alloc(&c, err) != 0) goto out;
    if (shard_start_pool(&c, err) != 0) goto out;
    pool_up = true;
    if (make_parent_dir(o->output_dir, err) != 0 || shard_open_tmp(&c, err) != 0) goto out;
    made_tmp = true;
    say(&c, "info",
        "sharding %zu tensors into %zu targets x %d ranks, %zu part(s) per rank "
        "(%s naming), %llu bytes per rank",
        c.w->ntensors, c.lay.ntargets, o->tp, c.nparts, naming_name(o->naming),
        (unsigned long long)c.lay.rank_bytes);

    if (shard_write_groups(&c, err) != 0) goto out;
    if (copy_side_files(&c, copied, err) != 0) goto out;
    ranks = rank_summary(&c);
    if (shard_write_manifest(&c, copied, ranks, err) != 0 || shard_publish(&c, err) != 0) goto out;
    made_tmp = false;
    rc = shard_result(&c, ranks, t0, result, err);
    ranks = NULL; /* taken over by shard_result */
out:
    if (made_tmp && !(rc != 0 && o->draining && o->draining(o->cb) && o->checkpoint))
        rm_flat(c.tmp_dir);
    json_decref(ranks);
    json_decref(copied);
    json_decref(c.files);
    json_decref(c.state);
    free(c.tmp_dir);
    if (pool_up) pool_stop(&c.pool);
    free(c.buf);
    free(c.sl);
    free(c.rf);
    free(c.parts);
    tp_layout_free(&c.lay);
    unmap_sources(&c);
    if (c.w) weights_close(c.w);
    return rc;
}
