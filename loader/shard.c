/*
 * shard.c - the sharded-state writer behind the shard job: plan parts from
 * the tp layout, stream every source tensor's slices into every rank's open
 * safetensors writer, re-read and check what was written, copy the config
 * and tokenizer files, write the manifest, publish by rename. See shard.h.
 */
#include "loader/shard.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/safetensors.h"
#include "loader/weights.h"
#include "util/fsutil.h"

/* Ranks written at once; a larger tp re-reads the source once per group so
 * that open file descriptors stay bounded. */
#define SHARD_RANK_GROUP 256
#define SHARD_MAX_COPY (512u << 20)

/* ------------------------------------------------------------------------ */
/* CRC-32C (Castagnoli): hardware on x86-64 with SSE4.2, else a table. Fast
 * enough that checking every byte written costs little next to the I/O. */

static uint32_t crc_table[256];
static void crc_table_init(void) {
    if (crc_table[1]) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t n) {
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const unsigned char *p,
                                                          size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

/* Running CRC-32C state (pre/post inversion left to the caller's 0 start:
 * we keep the raw register and invert at the end). */
static uint32_t crc_update(uint32_t crc, const void *buf, size_t n) {
    const unsigned char *p = buf;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return crc_hw(crc, p, n);
#endif
    return crc_sw(crc, p, n);
}

/* ------------------------------------------------------------------------ */
/* context                                                                   */

typedef struct rank_file {
    st_writer *w;
    uint32_t crc; /* raw register, starts at ~0 */
    uint64_t bytes;
    /* A second descriptor on the writer's "<path>.tmp" (its documented temp
     * name) used only to start writeback early, so that the writer's final
     * fsync finds little left to flush. -1 when unavailable. */
    int sync_fd;
    uint64_t unsynced;
} rank_file;

#define SHARD_WRITEBACK (64u << 20)

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
    unsigned char *buf, *gbuf; /* read chunk, per-rank gather */
    size_t buf_cap, gbuf_cap;
    tp_slice *sl;     /* tp slices of the current piece */
    rank_file *rf;    /* one per rank of the current group */
    uint64_t done, total, bytes_read, bytes_written;
    json_t *files;    /* per rank: array of {name, bytes, crc32c} */
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
    if (need > SIZE_MAX / 2) return mp_err(err, "too_large", "buffer of %llu bytes",
                                            (unsigned long long)need);
    unsigned char *n = realloc(*b, (size_t)need);
    if (!n) return mp_err(err, "no_memory", "out of memory (%llu bytes)", (unsigned long long)need);
    *b = n;
    *cap = (size_t)need;
    return 0;
}

static int rank_write(shard_ctx *c, int ri, const void *p, size_t n, mp_error *err) {
    if (n == 0) return 0;
    rank_file *f = &c->rf[ri];
    f->crc = crc_update(f->crc, p, n);
    if (st_writer_write(f->w, p, n, err) != 0) return -1;
    f->bytes += n;
    c->bytes_written += n;
    f->unsynced += n;
    if (f->sync_fd >= 0 && f->unsynced >= SHARD_WRITEBACK) {
        /* Advisory: failure only means the final fsync does more work. */
        (void)sync_file_range(f->sync_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        f->unsynced = 0;
    }
    return 0;
}

static int rank_zeros(shard_ctx *c, int ri, uint64_t n, mp_error *err) {
    while (n > 0) {
        size_t k = n < c->gbuf_cap ? (size_t)n : c->gbuf_cap;
        memset(c->gbuf, 0, k);
        if (rank_write(c, ri, c->gbuf, k, err) != 0) return -1;
        n -= k;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* streaming one source tensor to ranks [r0, r1)                             */

/* The source bytes [off, off + n) of t: a pointer into the file's map, or
 * read into c->buf. */
static const unsigned char *read_at(shard_ctx *c, const mp_tensor *t, size_t n, uint64_t off,
                                    mp_error *err) {
    c->bytes_read += n;
    const unsigned char *m = c->maps ? c->maps[t->file_index] : NULL;
    if (m && t->data_offset + off + n <= c->map_len[t->file_index])
        return m + t->data_offset + off;
    if (grow(&c->buf, &c->buf_cap, n, err) != 0) return NULL;
    if (weights_pread(c->w->fds[t->file_index], c->buf, n, t->data_offset + off, err) != 0)
        return NULL;
    return c->buf;
}

/* Done with source bytes [off, off + n) of t: drop them from our mapping so
 * that the resident set stays one chunk, not the model (the pages stay in
 * the page cache; touching them again just faults them back in). */
static void release_at(shard_ctx *c, const mp_tensor *t, size_t n, uint64_t off) {
    const unsigned char *m = c->maps ? c->maps[t->file_index] : NULL;
    if (!m || t->data_offset + off + n > c->map_len[t->file_index]) return;
    uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)(m + t->data_offset + off) & ~(pg - 1);
    uintptr_t b = (uintptr_t)(m + t->data_offset + off + n);
    (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

/* A slice whose data is one contiguous run along dim 0 followed by padding:
 * the rank's bytes are one byte range of the source plus zeros. */
static bool simple_dim0(const tp_slice *s, uint64_t *from, uint64_t *len, uint64_t *pad,
                        uint64_t inner) {
    *from = *len = *pad = 0;
    bool seen_pad = false;
    int data = 0;
    for (int k = 0; k < s->nseg; k++) {
        if (s->seg[k].start < 0) {
            seen_pad = true;
            *pad += inner * (uint64_t)s->seg[k].len;
        } else {
            if (seen_pad || data++) return false;
            *from = inner * (uint64_t)s->seg[k].start;
            *len = inner * (uint64_t)s->seg[k].len;
        }
    }
    return true;
}

static int stream_whole(shard_ctx *c, const mp_tensor *t, int r0, int r1, mp_error *err) {
    /* Views and odd slices: materialize the tensor, gather each rank's piece. */
    if (grow(&c->buf, &c->buf_cap, t->nbytes, err) != 0) return -1;
    if (weights_read(c->w, t, c->buf, err) != 0) return -1;
    c->bytes_read += t->nbytes;
    for (int r = r0; r < r1; r++) {
        const tp_slice *s = &c->sl[r];
        if (grow(&c->gbuf, &c->gbuf_cap, s->bytes, err) != 0) return -1;
        if (tp_slice_gather(t, s, c->buf, c->gbuf, err) != 0) return -1;
        if (rank_write(c, r - r0, c->gbuf, s->bytes, err) != 0) return -1;
    }
    return 0;
}

static int stream_piece(shard_ctx *c, const mp_tensor *t, int r0, int r1, mp_error *err) {
    for (int r = r0; r < r1; r++)
        if (tp_slice_for(&c->cfg, t, c->o->tp, r, c->o->naming, &c->sl[r], err) != 0) return -1;
    const tp_slice *s0 = &c->sl[r0];
    bool contiguous = !t->is_view && t->data_bytes == t->nbytes;
    if (!contiguous) return stream_whole(c, t, r0, r1, err);
    uint64_t inner = 0, outer = 1;
    if (s0->dim >= 0) {
        for (int d = 0; d < s0->dim; d++)
            outer *= (uint64_t)t->shape[d];
        if (!mp_tensor_bytes(t->dtype, t->shape + s0->dim + 1, t->ndim - s0->dim - 1, &inner))
            return stream_whole(c, t, r0, r1, err);
    }
    if (s0->dim < 0) {
        /* Replicated: every rank gets every chunk. */
        for (uint64_t off = 0; off < t->nbytes;) {
            size_t n = t->nbytes - off < SHARD_CHUNK ? (size_t)(t->nbytes - off) : SHARD_CHUNK;
            const unsigned char *b = read_at(c, t, n, off, err);
            if (!b) return -1;
            for (int r = r0; r < r1; r++)
                if (rank_write(c, r - r0, b, n, err) != 0) return -1;
            release_at(c, t, n, off);
            off += n;
            if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
        }
        return 0;
    }
    if (outer == 1) {
        /* Split along the outermost dim: each rank's data is a byte range.
         * Chunks run over the union of the ranges, so a byte that several
         * ranks share (replicated KV heads) is read once. */
        uint64_t lo = UINT64_MAX, hi = 0;
        for (int r = r0; r < r1; r++) {
            uint64_t f, l, p;
            if (!simple_dim0(&c->sl[r], &f, &l, &p, inner)) return stream_whole(c, t, r0, r1, err);
            if (l && f < lo) lo = f;
            if (l && f + l > hi) hi = f + l;
        }
        /* Ranks' ranges ascend with the rank (KV replicas share one), so a
         * forward sweep writes every rank's bytes in order. */
        for (uint64_t off = lo; lo < hi && off < hi;) {
            size_t n = hi - off < SHARD_CHUNK ? (size_t)(hi - off) : SHARD_CHUNK;
            const unsigned char *buf = read_at(c, t, n, off, err);
            if (!buf) return -1;
            for (int r = r0; r < r1; r++) {
                uint64_t f, l, p;
                simple_dim0(&c->sl[r], &f, &l, &p, inner);
                uint64_t a = f > off ? f : off, b = f + l < off + n ? f + l : off + n;
                if (l && a < b && rank_write(c, r - r0, buf + (a - off), b - a, err) != 0)
                    return -1;
            }
            release_at(c, t, n, off);
            off += n;
            if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
        }
        for (int r = r0; r < r1; r++) {
            uint64_t f, l, p;
            simple_dim0(&c->sl[r], &f, &l, &p, inner);
            if (p && rank_zeros(c, r - r0, p, err) != 0) return -1;
        }
        return 0;
    }
    /* Split along an inner dim (row-parallel [N, K] -> [N, K/tp]): read
     * whole outer rows in chunks; each rank takes its columns of them. */
    uint64_t row = inner * (uint64_t)t->shape[s0->dim];
    if (row == 0) return 0;
    uint64_t rows_per = SHARD_CHUNK / row ? SHARD_CHUNK / row : 1;
    for (uint64_t i = 0; i < outer;) {
        uint64_t k = outer - i < rows_per ? outer - i : rows_per;
        const unsigned char *buf = read_at(c, t, (size_t)(k * row), i * row, err);
        if (!buf) return -1;
        for (int r = r0; r < r1; r++) {
            const tp_slice *s = &c->sl[r];
            uint64_t per_row = inner * (uint64_t)s->shape[s0->dim];
            if (grow(&c->gbuf, &c->gbuf_cap, k * per_row, err) != 0) return -1;
            unsigned char *o = c->gbuf;
            for (uint64_t j = 0; j < k; j++)
                for (int g = 0; g < s->nseg; g++) {
                    uint64_t n = inner * (uint64_t)s->seg[g].len;
                    if (s->seg[g].start < 0)
                        memset(o, 0, n);
                    else
                        memcpy(o, buf + j * row + inner * (uint64_t)s->seg[g].start, n);
                    o += n;
                }
            if (rank_write(c, r - r0, c->gbuf, (size_t)(k * per_row), err) != 0) return -1;
        }
        release_at(c, t, (size_t)(k * row), i * row);
        i += k;
        if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
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

static int write_part(shard_ctx *c, size_t pi, int r0, int r1, mp_error *err) {
    const part_plan *p = &c->parts[pi];
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
        f->crc = ~0u;
        f->bytes = f->unsynced = 0;
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
            if (stream_piece(c, t, r0, r1, err) != 0) {
                if (strcmp(err->code, "cancelled") != 0 && !strstr(err->message, t->name)) {
                    char m[sizeof err->message];
                    snprintf(m, sizeof m, "%s: %s", t->name, err->message);
                    snprintf(err->message, sizeof err->message, "%s", m);
                }
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
    for (int i = 0; i < opened; i++) {
        rank_file *f = &c->rf[i];
        if (f->sync_fd >= 0) close(f->sync_fd);
        f->sync_fd = -1;
        if (rc == 0) {
            char path[PATH_MAX], name[NAME_MAX + 1];
            part_path(c, r0 + i, pi, path, sizeof path);
            snprintf(name, sizeof name, "%s", strrchr(path, '/') + 1);
            uint64_t total = 8 + st_writer_header_len(f->w) + st_writer_data_bytes(f->w);
            if (st_writer_finish(f->w, err) != 0) {
                rc = -1;
            } else {
                json_array_append_new(json_array_get(c->files, (size_t)(r0 + i)),
                                      json_pack("{s:s,s:I,s:I}", "name", name, "bytes",
                                                (json_int_t)total, "crc32c",
                                                (json_int_t)(uint32_t)~f->crc));
            }
        } else {
            st_writer_abort(f->w);
        }
        f->w = NULL;
    }
    json_decref(meta);
    free(wt);
    return rc;
}

/* Re-reads one written file: the tensor table must be the part's targets
 * and the data section's CRC-32C the one computed while writing. */
static int verify_file(shard_ctx *c, int rank, size_t pi, uint32_t want_crc, mp_error *err) {
    char path[PATH_MAX];
    part_path(c, rank, pi, path, sizeof path);
    mp_weights w = {0};
    if (st_open(path, &w, err) != 0) {
        char m[sizeof err->message];
        snprintf(m, sizeof m, "re-reading %s: %s", path, err->message);
        return mp_err(err, "verify_failed", "%s", m);
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
    if (rc == 0 && lo < hi)
        map = mmap(NULL, (size_t)hi, PROT_READ, MAP_SHARED, w.fds[0], 0);
    if (map != MAP_FAILED) {
        (void)madvise(map, (size_t)hi, MADV_SEQUENTIAL);
        const unsigned char *m = map;
        for (uint64_t off = lo; off < hi;) {
            /* windows dropped as they are done: the resident set stays small */
            uint64_t end = (off | (SHARD_CHUNK - 1)) + 1 < hi ? (off | (SHARD_CHUNK - 1)) + 1 : hi;
            crc = crc_update(crc, m + off, (size_t)(end - off));
            uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
            uintptr_t a = (uintptr_t)(m + off) & ~(pg - 1);
            (void)madvise((void *)a, (uintptr_t)(m + end) - a, MADV_DONTNEED);
            off = end;
        }
        munmap(map, (size_t)hi);
    } else {
        for (uint64_t off = lo; rc == 0 && lo < hi && off < hi;) {
            size_t n = hi - off < SHARD_CHUNK ? (size_t)(hi - off) : SHARD_CHUNK;
            if (weights_pread(w.fds[0], c->buf, n, off, err) != 0) {
                rc = -1;
                break;
            }
            crc = crc_update(crc, c->buf, n);
            off += n;
        }
    }
    if (rc == 0 && ~crc != want_crc)
        rc = mp_err(err, "verify_failed", "%s: data CRC-32C %08x, wrote %08x", path, ~crc,
                    want_crc);
    weights_free_fields(&w);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* files around the weights                                                  */

static bool is_side_file(const char *n) {
    static const char *const exact[] = {"config.json", "generation_config.json",
                                        "special_tokens_map.json", "added_tokens.json",
                                        "merges.txt", "vocab.json", "vocab.txt",
                                        "chat_template.json", "chat_template.jinja",
                                        "preprocessor_config.json", NULL};
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

/* ------------------------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int shard_run(const shard_opts *o, json_t **result, mp_error *err) {
    *result = NULL;
    crc_table_init();
    double t0 = now_s();
    shard_ctx c = {.o = o};
    int rc = -1;
    bool made_tmp = false;
    json_t *copied = json_array(), *manifest = NULL;
    if (o->tp < 1 || o->tp > 1024) {
        json_decref(copied);
        return mp_err(err, "bad_tp_size", "tp_size must be 1..1024");
    }
    if (tp_config_load(o->model_dir, &c.cfg, err) != 0) goto out;
    if (tp_check(&c.cfg, o->tp, err) != 0) goto out;
    struct stat st;
    if (!o->overwrite && lstat(o->output_dir, &st) == 0) {
        mp_err(err, "output_exists", "%s already exists (set params.overwrite to replace it)",
               o->output_dir);
        goto out;
    }
    if (weights_open(o->model_dir, &c.w, err) != 0) goto out;
    map_sources(&c);
    if (tp_layout_build(&c.cfg, c.w->tensors, c.w->ntensors, o->tp, o->naming, &c.lay, err) != 0)
        goto out;
    if (c.lay.ntargets == 0) {
        mp_err(err, "not_found", "no tensors to shard in %s", o->model_dir);
        goto out;
    }
    if (plan_parts(&c, err) != 0) goto out;
    for (size_t i = 0; i < c.w->ntensors; i++)
        c.total += c.w->tensors[i].nbytes;
    int group = o->tp < SHARD_RANK_GROUP ? o->tp : SHARD_RANK_GROUP;
    c.total *= (uint64_t)((o->tp + group - 1) / group);
    c.sl = calloc((size_t)o->tp, sizeof *c.sl);
    c.rf = calloc((size_t)group, sizeof *c.rf);
    c.files = json_array();
    if (!c.sl || !c.rf || !c.files ||
        asprintf(&c.tmp_dir, "%s.tmp-%ld", o->output_dir, (long)getpid()) < 0) {
        c.tmp_dir = NULL;
        mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    for (int r = 0; r < o->tp; r++)
        json_array_append_new(c.files, json_array());
    if (grow(&c.buf, &c.buf_cap, SHARD_CHUNK, err) != 0 ||
        grow(&c.gbuf, &c.gbuf_cap, SHARD_CHUNK, err) != 0)
        goto out;
    {
        char *parent = strdup(o->output_dir);
        char *sl = parent ? strrchr(parent, '/') : NULL;
        if (sl && sl != parent) *sl = 0;
        int prc = parent ? fs_mkdirs(parent, err) : mp_err(err, "no_memory", "out of memory");
        free(parent);
        if (prc != 0) goto out;
    }
    rm_flat(c.tmp_dir); /* leftovers of a crashed run with our pid */
    if (mkdir(c.tmp_dir, 0755) != 0) {
        mp_err(err, "io_error", "mkdir %s: %s", c.tmp_dir, strerror(errno));
        goto out;
    }
    made_tmp = true;
    say(&c, "info", "sharding %zu tensors into %zu targets x %d ranks, %zu part(s) per rank "
        "(%s naming), %llu bytes per rank", c.w->ntensors, c.lay.ntargets, o->tp, c.nparts,
        o->naming == TP_NAMING_HF ? "hf" : "sglang", (unsigned long long)c.lay.rank_bytes);

    for (int r0 = 0; r0 < o->tp; r0 += group) {
        int r1 = r0 + group < o->tp ? r0 + group : o->tp;
        for (size_t p = 0; p < c.nparts; p++)
            if (write_part(&c, p, r0, r1, err) != 0) goto out;
    }
    if (o->progress) o->progress(o->cb, c.total, c.total, "checking");
    for (int r = 0; r < o->tp; r++)
        for (size_t p = 0; p < c.nparts; p++) {
            json_t *f = json_array_get(json_array_get(c.files, (size_t)r), p);
            uint32_t crc = (uint32_t)json_integer_value(json_object_get(f, "crc32c"));
            if (verify_file(&c, r, p, crc, err) != 0) goto out;
            if (cancelled(&c)) {
                mp_err(err, "cancelled", "cancelled");
                goto out;
            }
        }
    if (copy_side_files(&c, copied, err) != 0) goto out;

    json_t *ranks = json_array();
    for (int r = 0; r < o->tp; r++) {
        json_t *fl = json_array_get(c.files, (size_t)r);
        json_int_t b = 0;
        size_t i;
        json_t *f;
        json_array_foreach(fl, i, f) b += json_integer_value(json_object_get(f, "bytes"));
        json_array_append_new(ranks, json_pack("{s:i,s:O,s:I}", "rank", r, "files", fl, "bytes", b));
    }
    const char *commit = commit_of(o->model_dir);
    manifest = json_pack(
        "{s:s,s:i,s:i,s:s,s:s,s:I,s:{s:s?,s:s?,s:s?,s:s},s:s,s:s,s:o,s:O,s:I,s:O,s:I}", "format",
        "sglang-sharded-state", "version", 1, "tp_size", o->tp, "naming",
        o->naming == TP_NAMING_HF ? "hf" : "sglang", "pattern", SHARD_PATTERN, "max_part_bytes",
        (json_int_t)(o->max_part_bytes ? o->max_part_bytes : SHARD_DEFAULT_PART_BYTES), "source",
        "model", o->source_model, "revision", o->source_revision, "commit", commit, "path",
        o->model_dir, "architecture", c.cfg.architecture, "model_type", c.cfg.model_type, "rules",
        rules_used(&c), "ranks", ranks, "parts", (json_int_t)c.nparts, "copied_files", copied,
        "rank_bytes", (json_int_t)c.lay.rank_bytes);
    if (!manifest) {
        json_decref(ranks);
        mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    {
        char *txt = json_dumps(manifest, JSON_INDENT(2) | JSON_SORT_KEYS);
        char mp[PATH_MAX];
        snprintf(mp, sizeof mp, "%s/%s", c.tmp_dir, SHARD_MANIFEST);
        int wrc = txt ? fs_write_atomic(mp, txt, strlen(txt), err)
                      : mp_err(err, "no_memory", "out of memory");
        free(txt);
        if (wrc != 0) {
            json_decref(ranks);
            goto out;
        }
    }
    /* Publish: the finished folder replaces the name in one rename. */
    char *old = NULL;
    if (lstat(o->output_dir, &st) == 0) {
        if (!o->overwrite) {
            json_decref(ranks);
            mp_err(err, "output_exists", "%s appeared while sharding", o->output_dir);
            goto out;
        }
        if (asprintf(&old, "%s.old-%ld", o->output_dir, (long)getpid()) < 0 ||
            rename(o->output_dir, old) != 0) {
            json_decref(ranks);
            mp_err(err, "io_error", "moving the old %s aside: %s", o->output_dir,
                   strerror(errno));
            free(old);
            goto out;
        }
    }
    if (rename(c.tmp_dir, o->output_dir) != 0) {
        json_decref(ranks);
        mp_err(err, "io_error", "rename %s: %s", c.tmp_dir, strerror(errno));
        if (old) rename(old, o->output_dir);
        free(old);
        goto out;
    }
    made_tmp = false;
    fs_sync_parent(o->output_dir);
    if (old) {
        rm_flat(old);
        free(old);
    }
    char mpath[PATH_MAX];
    snprintf(mpath, sizeof mpath, "%s/%s", o->output_dir, SHARD_MANIFEST);
    *result = json_pack("{s:s,s:s,s:i,s:s,s:I,s:o,s:I,s:I,s:I,s:f}", "output_path", o->output_dir,
                        "manifest", mpath, "tp_size", o->tp, "naming",
                        o->naming == TP_NAMING_HF ? "hf" : "sglang", "parts",
                        (json_int_t)c.nparts, "ranks", ranks, "rank_bytes",
                        (json_int_t)c.lay.rank_bytes, "bytes_read", (json_int_t)c.bytes_read,
                        "bytes_written", (json_int_t)c.bytes_written, "seconds", now_s() - t0);
    if (!*result) {
        mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    rc = 0;
out:
    if (made_tmp) rm_flat(c.tmp_dir);
    json_decref(copied);
    json_decref(manifest);
    json_decref(c.files);
    free(c.tmp_dir);
    free(c.buf);
    free(c.gbuf);
    free(c.sl);
    free(c.rf);
    free(c.parts);
    tp_layout_free(&c.lay);
    unmap_sources(&c);
    if (c.w) weights_close(c.w);
    return rc;
}
