/*
 * convert.c - the conversion engine behind conv_run (see convert.h): open
 * the source weights, decide the output tensors (tied duplicates dropped,
 * GGUF names mapped), write shards into a temp directory, read every tensor
 * back and compare, then publish the directory by rename.
 *
 * Bytes of one output tensor come from produce(), which hands them to a sink
 * in chunks of at most CONV_CHUNK bytes. Writing and verifying are two sinks
 * over the same producer, so what is checked is exactly what the source
 * yields again, not a copy of what was written.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/convert/convert.h"
#include "loader/formats/gguf/gguf.h"
#include "loader/formats/pytorch/pytorch.h"
#include "loader/formats/safetensors/safetensors.h"

#define CONV_CHUNK (8u << 20)

typedef struct citem {
    const mp_weights *w;
    const mp_tensor *t;
    char *name;   /* output name, owned */
    mp_dtype out; /* output dtype */
    uint64_t out_bytes;
    int64_t qk_heads; /* GGUF attn_q/attn_k: rows to un-permute with this many heads */
    uint32_t shard;
} citem;

typedef struct cctx {
    const conv_opts *o;
    mp_weights **ws;
    size_t nws;
    citem *items;
    size_t nitems;
    bool gguf;
    size_t nshards;
    char *tmp_dir;
    char *buf;  /* source chunk */
    char *cbuf; /* cast chunk */
    char *vbuf; /* verify: output chunk */
    uint64_t done, total;
    size_t ndedup;
    json_t *dedup;
} cctx;

typedef int (*sink_fn)(cctx *c, void *arg, const void *buf, size_t len, mp_error *err);

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

static void say(cctx *c, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(cctx *c, const char *level, const char *fmt, ...) {
    if (!c->o->log) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->o->log(c->o->cb, level, msg);
}

static bool cancelled(cctx *c) {
    return c->o->cancelled && c->o->cancelled(c->o->cb);
}

static void progress(cctx *c, const char *msg) {
    if (c->o->progress) c->o->progress(c->o->cb, c->done, c->total, msg);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int write_full(int fd, const void *buf, size_t len, mp_error *err) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "write: %s", strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A read-only window on [off, off + len) of a file. Mapped (pre-faulted)
 * rather than pread into a buffer: the bytes go from the page cache to the
 * output (or to memcmp) without a copy, and unmapping each window keeps the
 * resident set at one window. Falls back to pread into buf. */
typedef struct fwin {
    void *map;
    size_t maplen;
    const char *p;
} fwin;

static int win_open(int fd, uint64_t off, size_t len, char *buf, fwin *w, mp_error *err) {
    w->map = NULL;
    w->p = NULL;
    if (len == 0) {
        w->p = buf;
        return 0;
    }
    struct stat st;
    /* Never map past the end of the file: that would be SIGBUS, not an error. */
    if (fstat(fd, &st) == 0 && off <= (uint64_t)st.st_size && len <= (uint64_t)st.st_size - off) {
        uint64_t a = off - off % 4096u;
        size_t ml = (size_t)(off + len - a);
        void *m = mmap(NULL, ml, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)a);
        if (m != MAP_FAILED) {
            w->map = m;
            w->maplen = ml;
            w->p = (const char *)m + (off - a);
            return 0;
        }
    }
    if (weights_pread(fd, buf, len, off, err) != 0) return -1;
    w->p = buf;
    return 0;
}

static void win_close(fwin *w) {
    if (w->map) munmap(w->map, w->maplen);
    w->map = NULL;
}

/* Removes a flat directory we created (files only). */
int conv_rm_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : -1;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (unlinkat(dirfd(d), e->d_name, 0) != 0) rc = -1;
    }
    closedir(d);
    if (rmdir(dir) != 0) rc = -1;
    return rc;
}

int conv_sync_path(const char *path, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mp_err(err, "io_error", "open %s: %s", path, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    if (rc != 0) return mp_err(err, "io_error", "fsync %s: %s", path, strerror(errno));
    return 0;
}

/* Written as <path>.tmp, fsynced and renamed over path, like every other
 * output: a crash never leaves a half-written JSON file under its name. */
int conv_write_json(const char *path, json_t *doc, mp_error *err) {
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return mp_err(err, "io_error", "path too long: %s", path);
    char *text = json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int rc = 0;
    if (fd < 0)
        rc = mp_err(err, "io_error", "create %s: %s", tmp, strerror(errno));
    else {
        rc = write_full(fd, text, strlen(text), err);
        if (rc == 0) rc = write_full(fd, "\n", 1, err);
        if (rc == 0 && fsync(fd) != 0)
            rc = mp_err(err, "io_error", "fsync %s: %s", tmp, strerror(errno));
        if (close(fd) != 0 && rc == 0)
            rc = mp_err(err, "io_error", "close %s: %s", tmp, strerror(errno));
        if (rc == 0 && rename(tmp, path) != 0)
            rc = mp_err(err, "io_error", "rename %s: %s", tmp, strerror(errno));
        if (rc != 0) unlink(tmp);
    }
    free(text);
    return rc;
}

static int copy_file(const char *src, const char *dst, char *buf, size_t bufsz, mp_error *err) {
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return mp_err(err, "io_error", "open %s: %s", src, strerror(errno));
    int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        close(in);
        return mp_err(err, "io_error", "create %s: %s", dst, strerror(errno));
    }
    int rc = 0;
    for (;;) {
        ssize_t n = read(in, buf, bufsz);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            rc = mp_err(err, "io_error", "read %s: %s", src, strerror(errno));
            break;
        }
        if (n == 0) break;
        if ((rc = write_full(out, buf, (size_t)n, err)) != 0) break;
    }
    if (rc == 0 && fsync(out) != 0) rc = mp_err(err, "io_error", "fsync: %s", strerror(errno));
    close(in);
    close(out);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* planning                                                                  */

static bool strides_contiguous(const mp_tensor *t) {
    if (!t->is_view) return true;
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != s) return false;
        if (__builtin_mul_overflow(s, t->shape[i], &s)) return false;
    }
    return true;
}

typedef struct vkey {
    size_t idx;
    const mp_tensor *t;
    uint32_t wi;
} vkey;

static int cmp_vkey(const void *a, const void *b) {
    const vkey *x = a, *y = b;
    if (x->wi != y->wi) return x->wi < y->wi ? -1 : 1;
    if (x->t->file_index != y->t->file_index) return x->t->file_index < y->t->file_index ? -1 : 1;
    if (x->t->storage_id != y->t->storage_id) return x->t->storage_id < y->t->storage_id ? -1 : 1;
    if (x->t->storage_offset != y->t->storage_offset)
        return x->t->storage_offset < y->t->storage_offset ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* dup_of[i] = index (in the flat tensor order) of the first tensor that is
 * the very same view as tensor i, or SIZE_MAX. */
static int find_tied(cctx *c, size_t total, size_t *dup_of, mp_error *err) {
    vkey *k = malloc((total ? total : 1) * sizeof *k);
    if (!k) return mp_err(err, "no_memory", "out of memory");
    size_t n = 0, flat = 0;
    for (size_t wi = 0; wi < c->nws; wi++)
        for (size_t i = 0; i < c->ws[wi]->ntensors; i++, flat++) {
            dup_of[flat] = SIZE_MAX;
            const mp_tensor *t = &c->ws[wi]->tensors[i];
            if (t->storage_id >= 0) k[n++] = (vkey){flat, t, (uint32_t)wi};
        }
    if (n > 1) qsort(k, n, sizeof *k, cmp_vkey);
    for (size_t a = 0; a < n;) {
        size_t b = a + 1;
        while (b < n && k[b].wi == k[a].wi && k[b].t->file_index == k[a].t->file_index &&
               k[b].t->storage_id == k[a].t->storage_id &&
               k[b].t->storage_offset == k[a].t->storage_offset)
            b++;
        for (size_t i = a + 1; i < b; i++)
            for (size_t j = a; j < i; j++)
                if (dup_of[k[j].idx] == SIZE_MAX && pt_same_view(k[i].t, k[j].t)) {
                    dup_of[k[i].idx] = k[j].idx;
                    break;
                }
        a = b;
    }
    free(k);
    return 0;
}

static int64_t meta_int(const json_t *meta, const char *arch, const char *suffix) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    json_t *v = json_object_get(meta, key);
    return json_is_integer(v) ? (int64_t)json_integer_value(v) : -1;
}

/* Output dtype and Q/K handling of one GGUF tensor. */
static int plan_gguf(cctx *c, const mp_weights *w, const mp_tensor *t, const char *arch, citem *it,
                     mp_error *err) {
    int gt = gguf_tensor_type(t);
    mp_dtype want = c->o->dtype;
    if (t->dtype == MP_DT_GGML) {
        if (!gguf_can_dequant(gt))
            return mp_err(err, "unsupported_format", "tensor '%s': cannot dequantize %s", t->name,
                          gguf_type_name(gt) ? gguf_type_name(gt) : "this type");
        it->out = want != MP_DT_INVALID ? want : MP_DT_F16;
    } else if (conv_castable(t->dtype)) {
        it->out = want != MP_DT_INVALID ? want : t->dtype;
    } else {
        it->out = t->dtype;
    }
    it->qk_heads = 0;
    if (gguf_arch_permutes_qk(arch)) {
        const char *dot = strrchr(t->name, '.');
        size_t blen = dot ? (size_t)(dot - t->name) : strlen(t->name);
        bool q = blen >= 7 && memcmp(t->name + blen - 7, ".attn_q", 7) == 0;
        bool k = blen >= 7 && memcmp(t->name + blen - 7, ".attn_k", 7) == 0;
        if (q || k) {
            int64_t h = meta_int(w->metadata, arch, "attention.head_count");
            int64_t hkv = meta_int(w->metadata, arch, "attention.head_count_kv");
            if (hkv <= 0) hkv = h;
            it->qk_heads = q ? h : hkv;
            if (it->qk_heads <= 0)
                return mp_err(err, "bad_header", "%s.attention.head_count missing", arch);
        }
    }
    return 0;
}

static int open_sources(cctx *c, char **paths, size_t n, mp_error *err) {
    c->ws = calloc(n, sizeof *c->ws);
    if (!c->ws) return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
        if (weights_open(paths[i], &c->ws[i], err) != 0) return -1;
        c->nws++;
        mp_format f = c->ws[i]->format;
        if (f != MP_FMT_PT_ZIP && f != MP_FMT_PT_LEGACY && f != MP_FMT_GGUF)
            return mp_err(err, "unsupported_format", "%s: not a PyTorch or GGUF checkpoint",
                          paths[i]);
        if ((f == MP_FMT_GGUF) != (c->ws[0]->format == MP_FMT_GGUF) || (f == MP_FMT_GGUF && n > 1))
            return mp_err(err, "unsupported_format", "cannot convert a mix of GGUF and PyTorch");
        c->gguf = f == MP_FMT_GGUF;
    }
    return 0;
}

static int cmp_item_name(const void *a, const void *b) {
    return strcmp((*(const citem *const *)a)->name, (*(const citem *const *)b)->name);
}

static int plan(cctx *c, mp_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < c->nws; i++)
        total += c->ws[i]->ntensors;
    if (total == 0) return mp_err(err, "bad_header", "the checkpoint holds no tensors");
    c->items = calloc(total, sizeof *c->items);
    size_t *dup_of = malloc(total * sizeof *dup_of);
    if (!c->items || !dup_of) {
        free(dup_of);
        return mp_err(err, "no_memory", "out of memory");
    }
    int rc = c->gguf ? 0 : find_tied(c, total, dup_of, err);
    const char *arch = NULL;
    if (rc == 0 && c->gguf) {
        arch = json_string_value(json_object_get(c->ws[0]->metadata, "general.architecture"));
        if (!arch) rc = mp_err(err, "bad_header", "GGUF without general.architecture");
        for (size_t i = 0; i < total; i++)
            dup_of[i] = SIZE_MAX;
    }
    /* flat index -> item name, for the dedup report */
    const char **flat_name = rc == 0 ? calloc(total, sizeof *flat_name) : NULL;
    if (rc == 0 && !flat_name) rc = mp_err(err, "no_memory", "out of memory");
    size_t flat = 0;
    for (size_t wi = 0; rc == 0 && wi < c->nws; wi++) {
        const mp_weights *w = c->ws[wi];
        for (size_t i = 0; rc == 0 && i < w->ntensors; i++, flat++) {
            const mp_tensor *t = &w->tensors[i];
            flat_name[flat] = t->name;
            if (dup_of[flat] != SIZE_MAX) {
                c->ndedup++;
                json_array_append_new(c->dedup, json_pack("{s:s,s:s}", "name", t->name, "same_as",
                                                          flat_name[dup_of[flat]]));
                continue;
            }
            citem *it = &c->items[c->nitems];
            it->w = w;
            it->t = t;
            if (c->gguf) {
                char hf[512];
                int m = gguf_name_to_hf(arch, t->name, hf, sizeof hf);
                if (m == 1) {
                    say(c, "info", "%s has no Hugging Face counterpart: skipped", t->name);
                    continue;
                }
                if (m != 0) {
                    rc = mp_err(err, "unsupported_format",
                                "GGUF tensor '%s' (arch %s) has no Hugging Face name", t->name,
                                arch);
                    break;
                }
                if (!(it->name = strdup(hf))) rc = mp_err(err, "no_memory", "out of memory");
                if (rc == 0) rc = plan_gguf(c, w, t, arch, it, err);
            } else {
                if (!(it->name = strdup(t->name))) rc = mp_err(err, "no_memory", "out of memory");
                it->out = (c->o->dtype != MP_DT_INVALID && conv_castable(t->dtype)) ? c->o->dtype
                                                                                    : t->dtype;
            }
            if (rc == 0 && !mp_tensor_bytes(it->out, t->shape, t->ndim, &it->out_bytes))
                rc = mp_err(err, "bad_header", "tensor '%s': size overflows", t->name);
            c->nitems++;
        }
    }
    free(flat_name);
    free(dup_of);
    if (rc != 0) return rc;
    /* Names must be unique across source files (a sharded .bin without an
     * index is merged here, not by the reader). */
    citem **byname = malloc((c->nitems ? c->nitems : 1) * sizeof *byname);
    if (!byname) return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < c->nitems; i++)
        byname[i] = &c->items[i];
    qsort(byname, c->nitems, sizeof *byname, cmp_item_name);
    for (size_t i = 1; rc == 0 && i < c->nitems; i++)
        if (strcmp(byname[i - 1]->name, byname[i]->name) == 0)
            rc = mp_err(err, "bad_header", "tensor '%s' appears twice", byname[i]->name);
    free(byname);
    if (rc != 0) return rc;
    uint64_t *bytes = malloc(c->nitems * sizeof *bytes);
    uint32_t *shard_of = malloc(c->nitems * sizeof *shard_of);
    if (!bytes || !shard_of) {
        free(bytes);
        free(shard_of);
        return mp_err(err, "no_memory", "out of memory");
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < c->nitems; i++) {
        bytes[i] = c->items[i].out_bytes;
        sum += bytes[i];
    }
    uint64_t max = c->o->max_shard_bytes ? c->o->max_shard_bytes : CONV_DEFAULT_MAX_SHARD;
    c->nshards = conv_plan_shards(bytes, c->nitems, max, shard_of);
    for (size_t i = 0; i < c->nitems; i++)
        c->items[i].shard = shard_of[i];
    free(bytes);
    free(shard_of);
    if (c->nshards > 99999)
        return mp_err(err, "too_large", "over 99999 shards: raise max_shard_bytes");
    c->total = 2 * sum; /* written once, read back once */
    return 0;
}

/* ------------------------------------------------------------------------ */
/* producing a tensor's output bytes                                         */

static int emit_chunks(cctx *c, const char *data, uint64_t len, sink_fn sink, void *arg,
                       mp_error *err) {
    for (uint64_t pos = 0; pos < len;) {
        size_t k = len - pos < CONV_CHUNK ? (size_t)(len - pos) : CONV_CHUNK;
        if (sink(c, arg, data + pos, k, err) != 0) return -1;
        pos += k;
    }
    return 0;
}

/* The whole tensor in memory: views (gathered), GGUF block types
 * (dequantized) and tensors whose rows get un-permuted. */
static int produce_whole(cctx *c, const citem *it, sink_fn sink, void *arg, mp_error *err) {
    const mp_tensor *t = it->t;
    int gt = c->gguf ? gguf_tensor_type(t) : -1;
    bool deq = c->gguf && gguf_can_dequant(gt) &&
               (it->out == MP_DT_F32 || it->out == MP_DT_F16 || it->out == MP_DT_BF16) &&
               (t->dtype == MP_DT_GGML || conv_castable(t->dtype));
    char *out = malloc(it->out_bytes ? it->out_bytes : 1);
    if (!out)
        return mp_err(err, "no_memory", "tensor '%s': cannot hold %llu bytes", t->name,
                      (unsigned long long)it->out_bytes);
    int rc = 0;
    if (deq) {
        rc = gguf_tensor_dequant(it->w, t, it->out, out, err);
    } else if (it->out == t->dtype) {
        rc = weights_read(it->w, t, out, err);
    } else {
        char *src = malloc(t->nbytes ? t->nbytes : 1);
        uint64_t numel = 0;
        mp_shape_numel(t->shape, t->ndim, &numel);
        if (!src)
            rc = mp_err(err, "no_memory", "out of memory");
        else if ((rc = weights_read(it->w, t, src, err)) == 0 &&
                 !conv_cast(t->dtype, it->out, src, out, (size_t)numel))
            rc = mp_err(err, "internal", "cannot cast %s", mp_dtype_name(t->dtype));
        free(src);
    }
    if (rc == 0 && it->qk_heads > 0 && t->ndim >= 1 && t->shape[0] > 0) {
        size_t row = (size_t)(it->out_bytes / (uint64_t)t->shape[0]);
        rc = gguf_qk_unpermute(out, t->shape[0], row, it->qk_heads, err);
    }
    if (rc == 0) rc = emit_chunks(c, out, it->out_bytes, sink, arg, err);
    free(out);
    return rc;
}

static int produce(cctx *c, const citem *it, sink_fn sink, void *arg, mp_error *err) {
    const mp_tensor *t = it->t;
    if (it->out_bytes == 0) return 0;
    bool whole = !strides_contiguous(t) || it->qk_heads > 0 || t->dtype == MP_DT_GGML;
    if (whole) return produce_whole(c, it, sink, arg, err);
    unsigned bits = mp_dtype_bits(t->dtype);
    uint64_t start = 0;
    if (t->storage_offset != 0 &&
        (t->storage_offset < 0 || bits % 8 ||
         __builtin_mul_overflow((uint64_t)t->storage_offset, (uint64_t)(bits / 8), &start)))
        return mp_err(err, "bad_header", "tensor '%s': bad storage offset", t->name);
    if (start > t->data_bytes || t->nbytes > t->data_bytes - start)
        return mp_err(err, "bad_header", "tensor '%s': outside its storage", t->name);
    int fd = it->w->fds[t->file_index];
    uint64_t off = t->data_offset + start;
    if (it->out == t->dtype) {
        for (uint64_t pos = 0; pos < t->nbytes;) {
            size_t k = t->nbytes - pos < CONV_CHUNK ? (size_t)(t->nbytes - pos) : CONV_CHUNK;
            fwin w;
            if (win_open(fd, off + pos, k, c->buf, &w, err) != 0) return -1;
            int rc = sink(c, arg, w.p, k, err);
            win_close(&w);
            if (rc != 0) return -1;
            pos += k;
        }
        return 0;
    }
    size_t ses = bits / 8, des = mp_dtype_bits(it->out) / 8;
    size_t per = CONV_CHUNK / (ses > des ? ses : des);
    uint64_t numel = t->nbytes / ses;
    for (uint64_t e = 0; e < numel;) {
        size_t k = numel - e < per ? (size_t)(numel - e) : per;
        fwin w;
        if (win_open(fd, off + e * ses, k * ses, c->buf, &w, err) != 0) return -1;
        bool ok = conv_cast(t->dtype, it->out, w.p, c->cbuf, k);
        win_close(&w);
        if (!ok) return mp_err(err, "internal", "cannot cast %s", mp_dtype_name(t->dtype));
        if (sink(c, arg, c->cbuf, k * des, err) != 0) return -1;
        e += k;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* writing                                                                   */

typedef struct wsink {
    st_writer *w;
    int kick_fd;       /* read-only fd on the writer's temp file, or -1 */
    uint64_t unkicked; /* bytes written since writeback was last started */
} wsink;

#define CONV_KICK (64u << 20)

static int sink_write(cctx *c, void *arg, const void *buf, size_t len, mp_error *err) {
    wsink *ws = arg;
    if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
    if (st_writer_write(ws->w, buf, len, err) != 0) return -1;
    c->done += len;
    progress(c, NULL);
    /* Start writeback of what is written so far without waiting for it, so
     * the disk works while we produce the next bytes and the final fsync
     * has little left to do. */
    ws->unkicked += len;
    if (ws->kick_fd >= 0 && ws->unkicked >= CONV_KICK) {
        sync_file_range(ws->kick_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        ws->unkicked = 0;
    }
    return 0;
}

/* Writes shard s (its items, in the writer's order) to path. This is the one
 * place a shard file is produced: an encrypting writer slots in here. */
static int conv_write_shard(cctx *c, size_t s, const char *path, mp_error *err) {
    size_t n = 0;
    for (size_t i = 0; i < c->nitems; i++)
        n += c->items[i].shard == s;
    st_wtensor *ts = calloc(n ? n : 1, sizeof *ts);
    size_t *idx = calloc(n ? n : 1, sizeof *idx);
    json_t *meta = json_pack("{s:s}", "format", "pt");
    int rc = 0;
    if (!ts || !idx || !meta) rc = mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0, k = 0; rc == 0 && i < c->nitems; i++) {
        const citem *it = &c->items[i];
        if (it->shard != s) continue;
        ts[k].name = it->name;
        ts[k].dtype = it->out;
        ts[k].ndim = it->t->ndim;
        memcpy(ts[k].shape, it->t->shape, sizeof ts[k].shape);
        idx[k++] = i;
    }
    st_writer *w = NULL;
    if (rc == 0) rc = st_writer_open(path, ts, n, meta, &w, err);
    /* st_writer writes to "<path>.tmp" (safetensors.h) */
    char tmp[PATH_MAX];
    wsink ws = {w, -1, 0};
    if (rc == 0 && snprintf(tmp, sizeof tmp, "%s.tmp", path) < (int)sizeof tmp)
        ws.kick_fd = open(tmp, O_RDONLY | O_CLOEXEC);
    for (size_t k = 0; rc == 0 && k < n; k++) {
        const citem *it = &c->items[idx[st_writer_order(w, k)]];
        if (cancelled(c)) rc = mp_err(err, "cancelled", "cancelled");
        if (rc == 0) rc = produce(c, it, sink_write, &ws, err);
    }
    if (ws.kick_fd >= 0) close(ws.kick_fd);
    rc = st_writer_end(w, rc, err);
    json_decref(meta);
    free(ts);
    free(idx);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* verifying                                                                 */

typedef struct vsink {
    int fd;
    uint64_t off; /* next output byte to compare */
    const char *name;
} vsink;

static int sink_verify(cctx *c, void *arg, const void *buf, size_t len, mp_error *err) {
    vsink *v = arg;
    if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
    fwin w;
    if (win_open(v->fd, v->off, len, c->vbuf, &w, err) != 0) return -1;
    int same = memcmp(w.p, buf, len) == 0;
    win_close(&w);
    if (!same)
        return mp_err(err, "verify_failed", "the output tensors do not match for key %s", v->name);
    v->off += len;
    c->done += len;
    progress(c, NULL);
    return 0;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const mp_tensor *const *)a)->name, (*(const mp_tensor *const *)b)->name);
}

/* Re-opens shard s from disk and compares every tensor with the source. */
static int verify_shard(cctx *c, size_t s, const char *path, mp_error *err) {
    mp_weights w = {0};
    if (st_open(path, &w, err) != 0) {
        weights_free_fields(&w);
        return -1;
    }
    int rc = 0;
    size_t n = 0;
    for (size_t i = 0; i < c->nitems; i++)
        n += c->items[i].shard == s;
    const char *fmt = json_string_value(json_object_get(w.metadata, "format"));
    if (w.ntensors != n)
        rc =
            mp_err(err, "verify_failed", "%s holds %zu tensors, expected %zu", path, w.ntensors, n);
    else if (!fmt || strcmp(fmt, "pt") != 0)
        rc = mp_err(err, "verify_failed", "%s lacks __metadata__ format pt", path);
    mp_tensor **by = rc == 0 ? malloc((n ? n : 1) * sizeof *by) : NULL;
    if (rc == 0 && !by) rc = mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++)
        by[i] = &w.tensors[i];
    if (rc == 0 && n > 1) qsort(by, n, sizeof *by, cmp_tensor_name);
    for (size_t i = 0; rc == 0 && i < c->nitems; i++) {
        const citem *it = &c->items[i];
        if (it->shard != s) continue;
        mp_tensor key = {.name = it->name}, *kp = &key;
        mp_tensor **hit = bsearch(&kp, by, n, sizeof *by, cmp_tensor_name);
        if (!hit) {
            rc = mp_err(err, "verify_failed", "%s: tensor %s missing", path, it->name);
            break;
        }
        const mp_tensor *o = *hit;
        bool same = o->dtype == it->out && o->ndim == it->t->ndim && o->nbytes == it->out_bytes;
        for (int d = 0; same && d < o->ndim; d++)
            same = o->shape[d] == it->t->shape[d];
        if (!same) {
            rc = mp_err(err, "verify_failed", "%s: tensor %s has the wrong dtype or shape", path,
                        it->name);
            break;
        }
        vsink v = {w.fds[o->file_index], o->data_offset, it->name};
        if (cancelled(c)) rc = mp_err(err, "cancelled", "cancelled");
        if (rc == 0) rc = produce(c, it, sink_verify, &v, err);
    }
    free(by);
    weights_free_fields(&w);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* the output directory                                                      */

static int write_index(cctx *c, mp_error *err) {
    st_index idx = {0};
    idx.nfiles = c->nshards;
    idx.files = calloc(c->nshards, sizeof *idx.files);
    idx.nnames = c->nitems;
    idx.names = calloc(c->nitems, sizeof *idx.names);
    idx.file_of = calloc(c->nitems, sizeof *idx.file_of);
    int rc = 0;
    if (!idx.files || !idx.names || !idx.file_of) rc = mp_err(err, "no_memory", "out of memory");
    for (size_t s = 0; rc == 0 && s < c->nshards; s++) {
        char nm[64];
        conv_shard_name(s, c->nshards, nm, sizeof nm);
        if (!(idx.files[s] = strdup(nm))) rc = mp_err(err, "no_memory", "out of memory");
    }
    uint64_t total = 0;
    for (size_t i = 0; rc == 0 && i < c->nitems; i++) {
        if (!(idx.names[i] = strdup(c->items[i].name)))
            rc = mp_err(err, "no_memory", "out of memory");
        idx.file_of[i] = c->items[i].shard;
        total += c->items[i].out_bytes;
    }
    idx.total_size = total;
    idx.has_total_size = true;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", c->tmp_dir);
    if (rc == 0) rc = st_index_write(path, &idx, err);
    st_index_free(&idx);
    return rc;
}

int conv_copy_aux(const char *src_dir, const char *tmp_dir, bool skip_config, char *buf,
                  size_t bufsz, mp_error *err) {
    DIR *d = opendir(src_dir);
    if (!d) return mp_err(err, "io_error", "open %s: %s", src_dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        const char *nm = e->d_name;
        if (nm[0] == '.' || conv_is_weight_file(nm)) continue;
        if (skip_config && strcmp(nm, "config.json") == 0) continue; /* the caller writes it */
        char from[PATH_MAX], to[PATH_MAX];
        if (snprintf(from, sizeof from, "%s/%s", src_dir, nm) >= (int)sizeof from ||
            snprintf(to, sizeof to, "%s/%s", tmp_dir, nm) >= (int)sizeof to)
            continue;
        struct stat st;
        if (stat(from, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        rc = copy_file(from, to, buf, bufsz, err);
    }
    closedir(d);
    return rc;
}

static int gguf_config(cctx *c, mp_error *err) {
    json_t *cfg = gguf_hf_config_weights(c->ws[0], err);
    if (!cfg) return -1;
    const char *dt = "float16";
    if (c->o->dtype == MP_DT_BF16) dt = "bfloat16";
    if (c->o->dtype == MP_DT_F32) dt = "float32";
    json_object_set_new(cfg, "torch_dtype", json_string(dt));
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", c->tmp_dir);
    int rc = conv_write_json(path, cfg, err);
    json_decref(cfg);
    return rc;
}

/* config.json must name the dtype the shards really hold: transformers
 * (torch_dtype="auto") and SGLang/vLLM (--dtype auto) load by it. A cast
 * gives it; with "keep" it is the float dtype holding most bytes. */
static int set_config_dtype(cctx *c, mp_error *err) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", c->tmp_dir);
    struct stat st;
    if (stat(path, &st) != 0) return 0; /* no config: nothing to correct */
    const char *name = NULL;
    if (c->o->dtype != MP_DT_INVALID) {
        name = conv_torch_dtype(c->o->dtype);
    } else if (c->nitems > 0) {
        mp_dtype *dts = malloc(c->nitems * sizeof *dts);
        uint64_t *bytes = malloc(c->nitems * sizeof *bytes);
        if (dts && bytes) {
            for (size_t i = 0; i < c->nitems; i++) {
                dts[i] = c->items[i].out;
                bytes[i] = c->items[i].out_bytes;
            }
            name = conv_dominant_torch_dtype(dts, bytes, c->nitems);
        }
        free(dts);
        free(bytes);
        if (!dts || !bytes) return mp_err(err, "no_memory", "out of memory");
    }
    if (!name) return 0; /* no float tensors: the config's dtype is not ours to set */
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!json_is_object(cfg)) {
        /* A config transformers could not read either: copied as it was. */
        json_decref(cfg);
        say(c, "warn", "config.json is not a JSON object (%s); its dtype was not updated", je.text);
        return 0;
    }
    int rc = 0;
    if (conv_config_set_dtype(cfg, name)) {
        rc = conv_write_json(path, cfg, err);
        if (rc == 0) say(c, "info", "config.json: torch_dtype and dtype set to %s", name);
    }
    json_decref(cfg);
    return rc;
}

static bool is_ours(const char *dir) {
    char p[PATH_MAX];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, CONV_MARKER);
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* Moves tmp_dir to out_dir. An existing empty directory or one an earlier
 * convert made is replaced; anything else is left alone. */
int conv_publish(const char *tmp_dir, const char *out, bool *old_left, mp_error *err) {
    *old_left = false;
    struct stat st;
    char old[PATH_MAX] = "";
    if (lstat(out, &st) == 0) {
        if (!S_ISDIR(st.st_mode))
            return mp_err(err, "output_exists", "%s exists and is not a directory", out);
        if (rmdir(out) != 0) {
            if (!is_ours(out))
                return mp_err(err, "output_exists",
                              "%s exists and was not made by modelprep; remove it or pick another "
                              "output",
                              out);
            snprintf(old, sizeof old, "%s.old-%ld", tmp_dir, (long)getpid());
            if (rename(out, old) != 0)
                return mp_err(err, "io_error", "rename %s: %s", out, strerror(errno));
        }
    }
    if (rename(tmp_dir, out) != 0) {
        int e = errno;
        if (old[0]) rename(old, out);
        return mp_err(err, "io_error", "rename %s -> %s: %s", tmp_dir, out, strerror(e));
    }
    if (old[0] && conv_rm_flat_dir(old) != 0) *old_left = true;
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", out);
    char *slash = strrchr(parent, '/');
    if (!slash)
        snprintf(parent, sizeof parent, ".");
    else if (slash == parent)
        slash[1] = 0;
    else
        *slash = 0;
    return conv_sync_path(parent, err);
}

int conv_make_tmp_dir(const char *out, const char *tag_in, const char *what, char **tmp,
                      mp_error *err) {
    *tmp = NULL;
    const char *slash = strrchr(out, '/');
    const char *base = slash ? slash + 1 : out;
    if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return mp_err(err, "bad_output", "output %s has no name", out);
    char tag[64];
    if (tag_in)
        snprintf(tag, sizeof tag, "%s", tag_in);
    else
        snprintf(tag, sizeof tag, "%ld", (long)getpid());
    /* Next to the target, so that publishing is a rename in one directory. */
    int plen = slash ? (int)(slash - out) : 1;
    if (asprintf(tmp, "%.*s/.%s.%s-%s", plen, slash ? out : ".", base, what, tag) < 0) {
        *tmp = NULL;
        return mp_err(err, "no_memory", "out of memory");
    }
    conv_rm_flat_dir(*tmp); /* a leftover of a crashed run with the same tag */
    if (mkdir(*tmp, 0755) != 0) {
        int e = errno;
        free(*tmp);
        *tmp = NULL;
        return mp_err(err, "io_error", "cannot create a temp folder next to %s: %s", out,
                      strerror(e));
    }
    return 0;
}

/* ------------------------------------------------------------------------ */

static void ctx_free(cctx *c) {
    for (size_t i = 0; i < c->nitems; i++)
        free(c->items[i].name);
    free(c->items);
    for (size_t i = 0; i < c->nws; i++)
        weights_close(c->ws[i]);
    free(c->ws);
    free(c->buf);
    free(c->cbuf);
    free(c->vbuf);
    json_decref(c->dedup);
    free(c->tmp_dir);
}

static const char *dtype_param(mp_dtype d) {
    return d == MP_DT_F16 ? "fp16" : d == MP_DT_BF16 ? "bf16" : d == MP_DT_F32 ? "fp32" : "keep";
}

static const char *fmt_name(mp_format f) {
    switch (f) {
    case MP_FMT_PT_ZIP:
        return "pt";
    case MP_FMT_PT_LEGACY:
        return "pt_legacy";
    case MP_FMT_GGUF:
        return "gguf";
    default:
        return "unknown";
    }
}

static int run(cctx *c, const char *src_dir, json_t *files, mp_error *err) {
    char path[PATH_MAX];
    for (size_t s = 0; s < c->nshards; s++) {
        char nm[64];
        conv_shard_name(s, c->nshards, nm, sizeof nm);
        snprintf(path, sizeof path, "%s/%s", c->tmp_dir, nm);
        progress(c, nm);
        if (conv_write_shard(c, s, path, err) != 0) return -1;
    }
    for (size_t s = 0; s < c->nshards; s++) {
        char nm[64];
        conv_shard_name(s, c->nshards, nm, sizeof nm);
        snprintf(path, sizeof path, "%s/%s", c->tmp_dir, nm);
        progress(c, "verifying");
        if (verify_shard(c, s, path, err) != 0) return -1;
        struct stat st;
        if (stat(path, &st) != 0) return mp_err(err, "io_error", "stat %s", path);
        json_array_append_new(files,
                              json_pack("{s:s,s:I}", "name", nm, "size", (json_int_t)st.st_size));
    }
    if (c->nshards > 1) {
        if (write_index(c, err) != 0) return -1;
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", c->tmp_dir);
        struct stat st;
        if (stat(path, &st) == 0)
            json_array_append_new(files,
                                  json_pack("{s:s,s:I}", "name", "model.safetensors.index.json",
                                            "size", (json_int_t)st.st_size));
    }
    if (c->gguf && gguf_config(c, err) != 0) return -1;
    /* c->buf is free during this phase; a GGUF's config.json is derived from it */
    if (src_dir && conv_copy_aux(src_dir, c->tmp_dir, c->gguf, c->buf, CONV_CHUNK, err) != 0)
        return -1;
    if (set_config_dtype(c, err) != 0) return -1;
    json_t *marker = json_pack("{s:s,s:s,s:s}", "created_by", "modelprep convert", "source",
                               c->o->src, "dtype", dtype_param(c->o->dtype));
    snprintf(path, sizeof path, "%s/%s", c->tmp_dir, CONV_MARKER);
    int rc = marker ? conv_write_json(path, marker, err) : mp_err(err, "no_memory", "no memory");
    json_decref(marker);
    if (rc != 0) return -1;
    if (conv_sync_path(c->tmp_dir, err) != 0) return -1;
    if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
    bool old_left = false;
    int rc2 = conv_publish(c->tmp_dir, c->o->out_dir, &old_left, err);
    if (old_left) say(c, "warn", "could not remove the old output next to %s", c->o->out_dir);
    return rc2;
}

int conv_run(const conv_opts *o, json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    cctx c = {.o = o};
    c.dedup = json_array();
    c.buf = malloc(CONV_CHUNK);
    c.cbuf = malloc(CONV_CHUNK);
    c.vbuf = malloc(CONV_CHUNK);
    if (!c.dedup || !c.buf || !c.cbuf || !c.vbuf) {
        ctx_free(&c);
        return mp_err(err, "no_memory", "out of memory");
    }
    if (o->dtype != MP_DT_INVALID && o->dtype != MP_DT_F16 && o->dtype != MP_DT_BF16 &&
        o->dtype != MP_DT_F32) {
        ctx_free(&c);
        return mp_err(err, "bad_request", "dtype must be keep, bf16, fp16 or fp32");
    }
    struct stat st;
    char **paths = NULL;
    size_t np = 0;
    int rc = 0;
    const char *src_dir = NULL;
    if (stat(o->src, &st) != 0) {
        rc = mp_err(err, "not_found", "%s: %s", o->src, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        src_dir = o->src;
        rc = conv_find_sources(o->src, &paths, &np, err);
    } else {
        paths = calloc(1, sizeof *paths);
        if (!paths || !(paths[0] = strdup(o->src)))
            rc = mp_err(err, "no_memory", "out of memory");
        else
            np = 1;
    }
    /* Open (and so unpickle) everything before the first byte is written:
     * an unsafe pickle fails the job with nothing on disk. */
    if (rc == 0) rc = open_sources(&c, paths, np, err);
    conv_free_paths(paths, np);
    if (rc == 0) rc = plan(&c, err);
    if (rc == 0) {
        say(&c, "info", "%zu tensors (%zu tied duplicates dropped) into %zu shard(s)", c.nitems,
            c.ndedup, c.nshards);
        rc = conv_make_tmp_dir(o->out_dir, o->tag, "convert", &c.tmp_dir, err);
    }
    json_t *files = json_array();
    if (rc == 0) rc = run(&c, src_dir, files, err);
    if (rc != 0 && c.tmp_dir) conv_rm_flat_dir(c.tmp_dir);
    if (rc == 0) {
        uint64_t bytes = c.total / 2;
        *result = json_pack("{s:s,s:O,s:I,s:I,s:I,s:O,s:s,s:s,s:b,s:f}", "output_path", o->out_dir,
                            "files", files, "tensors", (json_int_t)c.nitems, "bytes",
                            (json_int_t)bytes, "shared_tensors_deduplicated", (json_int_t)c.ndedup,
                            "deduplicated", c.dedup, "source_format", fmt_name(c.ws[0]->format),
                            "dtype", dtype_param(o->dtype), "verified", 1, "seconds", now_s() - t0);
        if (!*result) rc = mp_err(err, "no_memory", "out of memory");
    }
    json_decref(files);
    ctx_free(&c);
    return rc;
}
