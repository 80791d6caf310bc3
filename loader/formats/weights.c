/*
 * weights.c - format detection and dispatch through the handler table of
 * registry.c, the mp_weights container, and
 * weights_read: the one place that turns a descriptor into bytes, gathering
 * PyTorch views through their strides. A directory or an *.index.json opens
 * every shard and merges them into one table.
 */
#include "loader/formats/weights.h"
#include "loader/formats/formats_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_SSE2 1
#endif

#include "loader/formats/npy/npy.h"
#include "loader/formats/safetensors/safetensors.h"

/* Views whose byte span is at most this are read into memory and gathered
 * there; larger ones are mapped (a transposed 4 GB matrix would otherwise be
 * a 4 GB allocation on top of the 4 GB result). */
#define GATHER_READ_MAX (256u << 20)
#define MAX_SHARDS 100000

/* ------------------------------------------------------------------------ */
/* container                                                                 */

int weights_add_file(mp_weights *w, const char *path, int fd, mp_error *err) {
    if (w->nfiles >= UINT32_MAX - 1) return mp_err(err, "too_large", "too many files");
    char *p = strdup(path);
    char **files = realloc(w->files, (w->nfiles + 1) * sizeof *files);
    if (files) w->files = files;
    int *fds = realloc(w->fds, (w->nfiles + 1) * sizeof *fds);
    if (fds) w->fds = fds;
    mp_file_map *maps = realloc(w->maps, (w->nfiles + 1) * sizeof *maps);
    if (maps) w->maps = maps;
    if (!p || !files || !fds || !maps) {
        free(p);
        return mp_err(err, "io_error", "out of memory");
    }
    w->files[w->nfiles] = p;
    w->fds[w->nfiles] = fd;
    w->maps[w->nfiles] = (mp_file_map){0};
    w->nfiles++;
    return 0;
}

/* Grows geometrically; a returned pointer is valid until the next call. The
 * new tensor is zeroed except ggml_type and storage_id, which are -1 ("none")
 * so that a reader that forgets them does not claim ggml type 0 (F32). */
mp_tensor *weights_add_tensor(mp_weights *w, mp_error *err) {
    size_t cap = w->ntensors;
    /* capacity is implicit: the next power of two >= ntensors (min 16) */
    size_t have = 16;
    while (have < cap)
        have *= 2;
    if (w->ntensors == 0 || w->ntensors == have) {
        size_t want = w->ntensors == 0 ? 16 : have * 2;
        if (want > SIZE_MAX / sizeof(mp_tensor)) {
            mp_err(err, "too_large", "too many tensors");
            return NULL;
        }
        mp_tensor *t = realloc(w->tensors, want * sizeof *t);
        if (!t) {
            mp_err(err, "io_error", "out of memory");
            return NULL;
        }
        w->tensors = t;
    }
    mp_tensor *t = &w->tensors[w->ntensors++];
    memset(t, 0, sizeof *t);
    t->ggml_type = -1;
    t->storage_id = -1;
    return t;
}

void weights_free_fields(mp_weights *w) {
    if (!w) return;
    for (uint32_t i = 0; i < w->nfiles; i++) {
        free(w->files[i]);
        if (w->fds && w->fds[i] >= 0) close(w->fds[i]);
        if (w->maps && w->maps[i].base) munmap(w->maps[i].base, (size_t)w->maps[i].len);
    }
    free(w->files);
    free(w->fds);
    free(w->maps);
    for (size_t i = 0; i < w->ntensors; i++)
        mp_tensor_free_fields(&w->tensors[i]);
    free(w->tensors);
    json_decref(w->metadata);
    if (w->impl && w->impl_free) w->impl_free(w->impl);
    memset(w, 0, sizeof *w);
}

void weights_close(mp_weights *w) {
    if (!w) return;
    weights_free_fields(w);
    free(w);
}

int weights_map_file(mp_weights *w, uint32_t i, mp_error *err) {
    if (!w || i >= w->nfiles || !w->maps)
        return mp_err(err, "bad_request", "no file %u to map", (unsigned)i);
    if (w->maps[i].base) return 0;
    struct stat st;
    if (fstat(w->fds[i], &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0 ||
        (uint64_t)st.st_size > SIZE_MAX)
        return 0;
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, w->fds[i], 0);
    if (m == MAP_FAILED) return 0;
    w->maps[i].base = m;
    w->maps[i].len = (uint64_t)st.st_size;
    return 0;
}

/* Copies at least this much with non-temporal stores (below, memcpy). */
#define STREAM_COPY_MIN (4u << 20)

/* memcpy for large tensor copies out of a mapping. The destination is a
 * buffer that is handed on (to a GPU upload, a write) rather than read back
 * at once, so caching it only evicts useful lines: non-temporal stores go
 * straight to memory. glibc switches to them only above a threshold sized
 * from the last-level cache (hundreds of MB on big-cache machines), which
 * per-tensor copies rarely reach, and its rep-movsb path below that runs at
 * about 60% of this loop's speed. Four pages are streamed side by side, as
 * glibc's own large copy does, to keep several memory streams open. */
static void copy_out(void *dst, const void *src, size_t n) {
#ifdef HAVE_SSE2
    if (n >= STREAM_COPY_MIN) {
        char *d = dst;
        const char *s = src;
        size_t head = (64 - ((uintptr_t)d & 63)) & 63;
        memcpy(d, s, head);
        d += head;
        s += head;
        n -= head;
        const size_t pg = 4096;
        for (; n >= 4 * pg; n -= 4 * pg, d += 4 * pg, s += 4 * pg)
            for (size_t i = 0; i < pg; i += 64)
                for (size_t p = 0; p < 4; p++) {
                    const __m128i *sv = (const __m128i *)(const void *)(s + p * pg + i);
                    __m128i *dv = (__m128i *)(void *)(d + p * pg + i);
                    __m128i a = _mm_loadu_si128(sv), b = _mm_loadu_si128(sv + 1),
                            c = _mm_loadu_si128(sv + 2), e = _mm_loadu_si128(sv + 3);
                    _mm_stream_si128(dv, a);
                    _mm_stream_si128(dv + 1, b);
                    _mm_stream_si128(dv + 2, c);
                    _mm_stream_si128(dv + 3, e);
                }
        /* streamed stores are weakly ordered: fence before anyone may look */
        _mm_sfence();
        memcpy(d, s, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Pointer to bytes [off, off + len) of file fi in its mapping, or NULL when
 * the file is not mapped, the range is outside the mapping, or the file has
 * shrunk below the range since (touching that would be SIGBUS; the pread
 * fallback then reports "truncated"). */
static const char *mapped_range(const mp_weights *w, uint32_t fi, uint64_t off, uint64_t len) {
    if (!w->maps || !w->maps[fi].base) return NULL;
    uint64_t mlen = w->maps[fi].len;
    if (off > mlen || len > mlen - off) return NULL;
    struct stat st;
    if (fstat(w->fds[fi], &st) != 0 || st.st_size < 0 || (uint64_t)st.st_size < off + len)
        return NULL;
    return (const char *)w->maps[fi].base + off;
}

int weights_pread(int fd, void *buf, size_t len, uint64_t off, mp_error *err) {
    char *p = buf;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
        return mp_err(err, "truncated", "read beyond any possible end of file");
    while (len > 0) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : len;
        ssize_t n = pread(fd, p, chunk, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "read: %s", strerror(errno));
        }
        if (n == 0) return mp_err(err, "truncated", "unexpected end of file");
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* detection                                                                 */

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static bool is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

/* "safetensors, PyTorch, GGUF or npy": each family of the table once, in
 * mp_format order (the order this message has always had). */
static void family_list(char *out, size_t cap) {
    const char *seen[32];
    size_t nseen = 0, len = 0;
    const mp_format_handler *const *h;
    int maxf = 0;
    for (h = mp_format_handlers; *h; h++)
        if ((int)(*h)->format > maxf) maxf = (int)(*h)->format;
    for (int f = 0; f <= maxf; f++)
        for (h = mp_format_handlers; *h; h++) {
            if ((int)(*h)->format != f) continue;
            bool dup = false;
            for (size_t i = 0; i < nseen && !dup; i++)
                dup = strcmp(seen[i], (*h)->name) == 0;
            if (!dup && nseen < sizeof seen / sizeof *seen) seen[nseen++] = (*h)->name;
        }
    out[0] = 0;
    for (size_t i = 0; i < nseen && len < cap; i++) {
        const char *sep = i == 0 ? "" : i + 1 == nseen ? " or " : ", ";
        int k = snprintf(out + len, cap - len, "%s%s", sep, seen[i]);
        if (k < 0) break;
        len += (size_t)k;
    }
}

/* The handler for a single file, or NULL with err set. */
static const mp_format_handler *detect_file(const char *path, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    unsigned char b[MP_FORMAT_HEAD_BYTES];
    ssize_t n = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        mp_err(err, "unsupported_format", "%s: not a regular file", path);
        return NULL;
    }
    do
        n = pread(fd, b, sizeof b, 0);
    while (n < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (n < 0) {
        mp_err(err, "io_error", "%s: %s", path, strerror(e));
        return NULL;
    }
    for (const mp_format_handler *const *h = mp_format_handlers; *h; h++)
        if ((*h)->detect(path, b, (size_t)n, (uint64_t)st.st_size)) return *h;
    char families[256];
    family_list(families, sizeof families);
    mp_err(err, "unsupported_format", "%s: not a %s file", path, families);
    return NULL;
}

static mp_format detect_file_format(const char *path, mp_error *err) {
    const mp_format_handler *h = detect_file(path, err);
    return h ? h->format : MP_FMT_UNKNOWN;
}

/* The file a directory is opened through, or NULL; *kind: 'i' index,
 * 'n' npcache, 's' loose *.safetensors. */
static char *dir_entry_point(const char *dir, char *kind) {
    static const char *const idx_names[] = {"model.safetensors.index.json",
                                            "pytorch_model.bin.index.json"};
    for (size_t i = 0; i < 2; i++) {
        char *p = path_join(dir, idx_names[i]);
        if (p && is_file(p)) {
            *kind = 'i';
            return p;
        }
        free(p);
        /* loose *.safetensors beat a pytorch index */
        if (i == 0) {
            DIR *d = opendir(dir);
            struct dirent *de;
            bool any = false;
            while (d && (de = readdir(d)))
                if (ends_with(de->d_name, ".safetensors") && de->d_name[0] != '.') any = true;
            if (d) closedir(d);
            if (any) {
                *kind = 's';
                return strdup(dir);
            }
        }
    }
    char *p = path_join(dir, "weight_names.json");
    if (p && is_file(p)) {
        *kind = 'n';
        free(p);
        return strdup(dir);
    }
    free(p);
    return NULL;
}

static mp_format detect_index(const char *path, mp_error *err) {
    st_index idx;
    if (st_index_read(path, &idx, err) != 0) return MP_FMT_UNKNOWN;
    mp_format f = MP_FMT_UNKNOWN;
    if (idx.nfiles == 0) {
        mp_err(err, "bad_header", "%s: weight_map is empty", path);
    } else {
        char *dir = strdup(path);
        char *slash = dir ? strrchr(dir, '/') : NULL;
        char *shard = NULL;
        if (dir) {
            if (slash)
                slash[1] = 0;
            else
                dir[0] = 0;
            shard = path_join(*dir ? dir : ".", idx.files[0]);
        }
        if (shard)
            f = detect_file_format(shard, err);
        else
            mp_err(err, "io_error", "out of memory");
        free(shard);
        free(dir);
    }
    st_index_free(&idx);
    return f;
}

mp_format weights_detect(const char *path, mp_error *err) {
    struct stat st;
    if (stat(path, &st) != 0) {
        mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path, strerror(errno));
        return MP_FMT_UNKNOWN;
    }
    if (S_ISDIR(st.st_mode)) {
        char kind = 0;
        char *entry = dir_entry_point(path, &kind);
        mp_format f = MP_FMT_UNKNOWN;
        if (!entry)
            mp_err(err, "not_found", "%s: no weight files in directory", path);
        else if (kind == 'i')
            f = detect_index(entry, err);
        else if (kind == 'n')
            f = MP_FMT_NPY;
        else
            f = MP_FMT_SAFETENSORS;
        free(entry);
        return f;
    }
    if (ends_with(path, ".index.json")) return detect_index(path, err);
    return detect_file_format(path, err);
}

/* ------------------------------------------------------------------------ */
/* multi-file: shards merged into one table                                  */

typedef struct multi_impl {
    size_t n;
    void **impls;
    void (**frees)(void *);
} multi_impl;

static void multi_free(void *p) {
    multi_impl *m = p;
    for (size_t i = 0; i < m->n; i++)
        if (m->impls[i] && m->frees[i]) m->frees[i](m->impls[i]);
    free(m->impls);
    free(m->frees);
    free(m);
}

/* Moves everything src owns into dst (file indexes and storage ids
 * renumbered); src is left zeroed. */
static int weights_merge(mp_weights *dst, mp_weights *src, int64_t *storage_base, mp_error *err) {
    uint32_t fbase = dst->nfiles;
    int rc = 0;
    for (uint32_t i = 0; i < src->nfiles && rc == 0; i++) {
        rc = weights_add_file(dst, src->files[i], src->fds[i], err);
        if (rc == 0) {
            src->fds[i] = -1;
            dst->maps[dst->nfiles - 1] = src->maps[i];
            src->maps[i] = (mp_file_map){0};
        }
    }
    int64_t smax = -1;
    for (size_t i = 0; i < src->ntensors && rc == 0; i++) {
        mp_tensor *t = weights_add_tensor(dst, err);
        if (!t) {
            rc = -1;
            break;
        }
        *t = src->tensors[i];
        src->tensors[i].name = NULL;
        t->file_index += fbase;
        if (t->storage_id >= 0) {
            if (t->storage_id > smax) smax = t->storage_id;
            t->storage_id += *storage_base;
        }
    }
    *storage_base += smax + 1;
    if (rc == 0 && !dst->metadata && src->metadata) {
        dst->metadata = src->metadata;
        src->metadata = NULL;
    }
    if (rc == 0 && src->impl) {
        multi_impl *m = dst->impl;
        void **ni = realloc(m->impls, (m->n + 1) * sizeof *ni);
        if (ni) m->impls = ni;
        void (**nf)(void *) = realloc(m->frees, (m->n + 1) * sizeof *nf);
        if (nf) m->frees = nf;
        if (!ni || !nf)
            rc = mp_err(err, "io_error", "out of memory");
        else {
            m->impls[m->n] = src->impl;
            m->frees[m->n] = src->impl_free;
            m->n++;
            src->impl = NULL;
        }
    }
    weights_free_fields(src);
    return rc;
}

static int tensor_ptr_name_cmp(const void *a, const void *b) {
    const mp_tensor *x = *(const mp_tensor *const *)a, *y = *(const mp_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int open_single(const char *path, mp_weights *w, mp_error *err);

/* Opens every file in paths[] and merges. idx, when given, is checked:
 * every name it maps must be in the shard it names. */
static int open_many(char **paths, size_t n, const st_index *idx, mp_weights *w, mp_error *err) {
    multi_impl *m = calloc(1, sizeof *m);
    if (!m) return mp_err(err, "io_error", "out of memory");
    w->impl = m;
    w->impl_free = multi_free;
    int64_t sbase = 0;
    for (size_t i = 0; i < n; i++) {
        mp_weights one = {0};
        if (open_single(paths[i], &one, err) != 0) {
            weights_free_fields(&one);
            return -1;
        }
        if (i == 0)
            w->format = one.format;
        else if ((w->format == MP_FMT_SAFETENSORS) != (one.format == MP_FMT_SAFETENSORS)) {
            weights_free_fields(&one);
            return mp_err(err, "unsupported_format", "%s: shards mix formats", paths[i]);
        }
        if (weights_merge(w, &one, &sbase, err) != 0) return -1;
    }
    mp_tensor **byname = malloc((w->ntensors ? w->ntensors : 1) * sizeof *byname);
    if (!byname) return mp_err(err, "io_error", "out of memory");
    for (size_t i = 0; i < w->ntensors; i++)
        byname[i] = &w->tensors[i];
    if (w->ntensors > 1) qsort(byname, w->ntensors, sizeof *byname, tensor_ptr_name_cmp);
    int rc = 0;
    for (size_t i = 1; i < w->ntensors && rc == 0; i++)
        if (strcmp(byname[i - 1]->name, byname[i]->name) == 0)
            rc = mp_err(err, "bad_header", "tensor '%s' is in both %s and %s", byname[i]->name,
                        w->files[byname[i - 1]->file_index], w->files[byname[i]->file_index]);
    /* idx->names is sorted like byname: walk both. Shard order = idx->files
     * order = paths order, so file_of is the file index. */
    size_t j = 0;
    for (size_t i = 0; idx && rc == 0 && i < idx->nnames; i++) {
        while (j < w->ntensors && strcmp(byname[j]->name, idx->names[i]) < 0)
            j++;
        if (j == w->ntensors || strcmp(byname[j]->name, idx->names[i]) != 0)
            rc = mp_err(err, "bad_header", "index maps '%s' to %s, which does not hold it",
                        idx->names[i], idx->files[idx->file_of[i]]);
        else if (byname[j]->file_index != idx->file_of[i])
            rc = mp_err(err, "bad_header", "index maps '%s' to %s but it is in %s", idx->names[i],
                        idx->files[idx->file_of[i]], w->files[byname[j]->file_index]);
    }
    free(byname);
    return rc;
}

static int open_index(const char *path, mp_weights *w, mp_error *err) {
    st_index idx;
    if (st_index_read(path, &idx, err) != 0) return -1;
    if (idx.nfiles == 0 || idx.nfiles > MAX_SHARDS) {
        st_index_free(&idx);
        return mp_err(err, "bad_header", "%s: %zu shard files", path, idx.nfiles);
    }
    char *dir = strdup(path);
    char **paths = calloc(idx.nfiles, sizeof *paths);
    int rc = 0;
    if (!dir || !paths)
        rc = mp_err(err, "io_error", "out of memory");
    else {
        char *slash = strrchr(dir, '/');
        if (slash)
            slash[1] = 0;
        else
            strcpy(dir, ".");
    }
    for (size_t i = 0; rc == 0 && i < idx.nfiles; i++)
        if (!(paths[i] = path_join(dir, idx.files[i]))) rc = mp_err(err, "io_error", "no memory");
    if (rc == 0) rc = open_many(paths, idx.nfiles, &idx, w, err);
    for (size_t i = 0; paths && i < idx.nfiles; i++)
        free(paths[i]);
    free(paths);
    free(dir);
    st_index_free(&idx);
    return rc;
}

static int str_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int open_st_dir(const char *dir, mp_weights *w, mp_error *err) {
    DIR *d = opendir(dir);
    if (!d) return mp_err(err, "io_error", "%s: %s", dir, strerror(errno));
    char **paths = NULL;
    size_t n = 0;
    int rc = 0;
    struct dirent *de;
    while (rc == 0 && (de = readdir(d))) {
        if (de->d_name[0] == '.' || !ends_with(de->d_name, ".safetensors")) continue;
        if (n >= MAX_SHARDS) {
            rc = mp_err(err, "too_large", "%s: too many files", dir);
            break;
        }
        char **np = realloc(paths, (n + 1) * sizeof *np);
        if (np) paths = np;
        char *p = path_join(dir, de->d_name);
        if (!np || !p) {
            free(p);
            rc = mp_err(err, "io_error", "out of memory");
            break;
        }
        paths[n++] = p;
    }
    closedir(d);
    if (rc == 0 && n > 1) qsort(paths, n, sizeof *paths, str_cmp);
    if (rc == 0) rc = open_many(paths, n, NULL, w, err);
    for (size_t i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    return rc;
}

static int open_single(const char *path, mp_weights *w, mp_error *err) {
    const mp_format_handler *h = detect_file(path, err);
    return h ? h->open(path, w, err) : -1;
}

int weights_open(const char *path, mp_weights **out, mp_error *err) {
    *out = NULL;
    mp_weights *w = calloc(1, sizeof *w);
    if (!w) return mp_err(err, "io_error", "out of memory");
    int rc;
    struct stat st;
    if (stat(path, &st) != 0) {
        rc = mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path,
                    strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        char kind = 0;
        char *entry = dir_entry_point(path, &kind);
        if (!entry)
            rc = mp_err(err, "not_found", "%s: no weight files in directory", path);
        else if (kind == 'i')
            rc = open_index(entry, w, err);
        else if (kind == 'n')
            rc = npcache_open(entry, w, err);
        else
            rc = open_st_dir(entry, w, err);
        free(entry);
    } else if (ends_with(path, ".index.json")) {
        rc = open_index(path, w, err);
    } else {
        rc = open_single(path, w, err);
    }
    if (rc != 0) {
        weights_close(w);
        return -1;
    }
    *out = w;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* reading                                                                   */

static bool strides_contiguous(const mp_tensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != s) return false;
        if (__builtin_mul_overflow(s, t->shape[i], &s)) return false;
    }
    return true;
}

/* Copies the view out of src, where src points at storage element `base`
 * (so element e of the storage is at src + (e - base) * es). */
/* One element of es bytes; a switch on the size lets the compiler emit a
 * plain load/store instead of a memcpy call per element. */
static inline void copy_elem(char *d, const char *s, size_t es) {
    switch (es) {
    case 1:
        *d = *s;
        break;
    case 2:
        memcpy(d, s, 2);
        break;
    case 4:
        memcpy(d, s, 4);
        break;
    case 8:
        memcpy(d, s, 8);
        break;
    default:
        memcpy(d, s, es);
    }
}

/* The two innermost dims of a view whose last stride is not 1 (a saved
 * transpose) are copied in tiles of GATHER_TI result rows by GATHER_TJ
 * result columns, so that both the reads and the writes stay within a few
 * cache lines per row. */
#define GATHER_TI 64
#define GATHER_TJ 64
static inline __attribute__((always_inline)) void gather_2d_es(char *dst, const char *src,
                                                               int64_t off, int64_t rows,
                                                               int64_t cols, int64_t rs, int64_t cs,
                                                               size_t es) {
    for (int64_t i0 = 0; i0 < rows; i0 += GATHER_TI) {
        int64_t i1 = i0 + GATHER_TI < rows ? i0 + GATHER_TI : rows;
        for (int64_t j0 = 0; j0 < cols; j0 += GATHER_TJ) {
            int64_t j1 = j0 + GATHER_TJ < cols ? j0 + GATHER_TJ : cols;
            for (int64_t i = i0; i < i1; i++) {
                /* The reads of a tile hop between up to TJ rows far apart:
                 * no hardware prefetcher follows that, and each would be a
                 * full memory latency. So fetch the next tile's source, one
                 * of its runs per row of this one. */
                int64_t pj = j1 + (i - i0);
                if (pj < j1 + GATHER_TJ && pj < cols && rs == 1) {
                    const char *pf = src + (off + i0 + pj * cs) * (int64_t)es;
                    for (int64_t k = 0; k < (i1 - i0) * (int64_t)es; k += 64)
                        __builtin_prefetch(pf + k);
                }
                const char *s = src + (off + i * rs + j0 * cs) * (int64_t)es;
                char *d = dst + (size_t)(i * cols + j0) * es;
                for (int64_t j = j0; j < j1; j++, s += cs * (int64_t)es, d += es)
                    copy_elem(d, s, es);
            }
        }
    }
}

#ifdef HAVE_SSE2
/* A transposed 2- or 4-byte matrix (source rows are result columns):
 * 8x8 or 4x4 blocks moved by SSE2 unpacks, several times the speed of an
 * element at a time. dst element (i, j) = src element off + i + j * cs; the
 * caller has checked that the whole view lies inside src. Ragged edges go
 * element by element. */
static void transpose_block2(char *d, size_t dstride, const char *s, size_t sstride) {
    __m128i r[8], a[8], b[8];
    for (int k = 0; k < 8; k++)
        r[k] = _mm_loadu_si128((const __m128i *)(const void *)(s + (size_t)k * sstride));
    for (int k = 0; k < 4; k++) {
        a[2 * k] = _mm_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
    }
    b[0] = _mm_unpacklo_epi32(a[0], a[2]);
    b[1] = _mm_unpackhi_epi32(a[0], a[2]);
    b[2] = _mm_unpacklo_epi32(a[1], a[3]);
    b[3] = _mm_unpackhi_epi32(a[1], a[3]);
    b[4] = _mm_unpacklo_epi32(a[4], a[6]);
    b[5] = _mm_unpackhi_epi32(a[4], a[6]);
    b[6] = _mm_unpacklo_epi32(a[5], a[7]);
    b[7] = _mm_unpackhi_epi32(a[5], a[7]);
    for (int k = 0; k < 4; k++) {
        __m128i lo = _mm_unpacklo_epi64(b[k], b[k + 4]), hi = _mm_unpackhi_epi64(b[k], b[k + 4]);
        _mm_storeu_si128((__m128i *)(void *)(d + (size_t)(2 * k) * dstride), lo);
        _mm_storeu_si128((__m128i *)(void *)(d + (size_t)(2 * k + 1) * dstride), hi);
    }
}

static void transpose_block4(char *d, size_t dstride, const char *s, size_t sstride) {
    __m128i r[4];
    for (int k = 0; k < 4; k++)
        r[k] = _mm_loadu_si128((const __m128i *)(const void *)(s + (size_t)k * sstride));
    __m128i a0 = _mm_unpacklo_epi32(r[0], r[1]), a1 = _mm_unpackhi_epi32(r[0], r[1]);
    __m128i a2 = _mm_unpacklo_epi32(r[2], r[3]), a3 = _mm_unpackhi_epi32(r[2], r[3]);
    _mm_storeu_si128((__m128i *)(void *)d, _mm_unpacklo_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(void *)(d + dstride), _mm_unpackhi_epi64(a0, a2));
    _mm_storeu_si128((__m128i *)(void *)(d + 2 * dstride), _mm_unpacklo_epi64(a1, a3));
    _mm_storeu_si128((__m128i *)(void *)(d + 3 * dstride), _mm_unpackhi_epi64(a1, a3));
}

static void gather_transpose(char *dst, const char *src, int64_t off, int64_t rows, int64_t cols,
                             int64_t cs, size_t es) {
    const int64_t bk = es == 2 ? 8 : 4;
    size_t dstride = (size_t)cols * es, sstride = (size_t)cs * es;
    for (int64_t i0 = 0; i0 < rows; i0 += GATHER_TI) {
        int64_t i1 = i0 + GATHER_TI < rows ? i0 + GATHER_TI : rows;
        for (int64_t j0 = 0; j0 < cols; j0 += GATHER_TJ) {
            int64_t j1 = j0 + GATHER_TJ < cols ? j0 + GATHER_TJ : cols;
            /* the next tile's source rows: far apart, so no hardware
             * prefetcher would fetch them ahead */
            for (int64_t pj = j1; pj < j1 + GATHER_TJ && pj < cols; pj++)
                for (int64_t k = 0; k < (i1 - i0) * (int64_t)es; k += 64)
                    __builtin_prefetch(src + (off + i0 + pj * cs) * (int64_t)es + k);
            for (int64_t i = i0; i < i1; i += bk)
                for (int64_t j = j0; j < j1; j += bk) {
                    const char *s = src + (off + i + j * cs) * (int64_t)es;
                    char *d = dst + (size_t)(i * cols + j) * es;
                    if (i + bk <= i1 && j + bk <= j1) {
                        if (es == 2)
                            transpose_block2(d, dstride, s, sstride);
                        else
                            transpose_block4(d, dstride, s, sstride);
                        continue;
                    }
                    for (int64_t ii = 0; ii < bk && i + ii < i1; ii++)
                        for (int64_t jj = 0; jj < bk && j + jj < j1; jj++)
                            memcpy(d + (size_t)(ii * cols + jj) * es,
                                   s + (ii + jj * cs) * (int64_t)es, es);
                }
        }
    }
}
#endif

/* A plain transpose of 2- or 4-byte elements goes by SIMD blocks; anything
 * else through gather_2d_es with es a constant in each instance, so that the
 * inner loop is a plain load and store, not a size switch per element. */
static void gather_2d(char *dst, const char *src, int64_t off, int64_t rows, int64_t cols,
                      int64_t rs, int64_t cs, size_t es) {
#ifdef HAVE_SSE2
    if (rs == 1 && cs > 0 && (es == 2 || es == 4)) {
        gather_transpose(dst, src, off, rows, cols, cs, es);
        return;
    }
#endif
    switch (es) {
    case 2:
        gather_2d_es(dst, src, off, rows, cols, rs, cs, 2);
        break;
    case 4:
        gather_2d_es(dst, src, off, rows, cols, rs, cs, 4);
        break;
    case 8:
        gather_2d_es(dst, src, off, rows, cols, rs, cs, 8);
        break;
    default:
        gather_2d_es(dst, src, off, rows, cols, rs, cs, es);
    }
}

/* Copies the view out of src, where src points at storage element `base`
 * (so element e of the storage is at src + (e - base) * es). */
static void gather(char *dst, const char *src, int64_t base, const mp_tensor *t, size_t es) {
    int nd = t->ndim;
    int64_t off = t->storage_offset - base;
    if (nd == 0) {
        memcpy(dst, src + off * (int64_t)es, es);
        return;
    }
    int64_t inner = t->shape[nd - 1], istr = t->strides[nd - 1];
    /* strided innermost dim: walk the two innermost dims as tiles */
    int tiled = istr != 1 && nd >= 2;
    int last_outer = tiled ? nd - 3 : nd - 2;
    int64_t idx[MP_MAX_DIMS] = {0};
    for (;;) {
        if (tiled) {
            int64_t rows = t->shape[nd - 2];
            gather_2d(dst, src, off, rows, inner, t->strides[nd - 2], istr, es);
            dst += (size_t)(rows * inner) * es;
        } else if (istr == 1) {
            memcpy(dst, src + off * (int64_t)es, (size_t)inner * es);
            dst += (size_t)inner * es;
        } else {
            for (int64_t j = 0; j < inner; j++) {
                copy_elem(dst, src + (off + j * istr) * (int64_t)es, es);
                dst += es;
            }
        }
        int d = last_outer;
        for (; d >= 0; d--) {
            off += t->strides[d];
            if (++idx[d] < t->shape[d]) break;
            off -= t->shape[d] * t->strides[d];
            idx[d] = 0;
        }
        if (d < 0) break;
    }
}

static int read_view(const mp_weights *w, const mp_tensor *t, void *dst, mp_error *err) {
    unsigned bits = mp_dtype_bits(t->dtype);
    if (bits == 0 || bits % 8)
        return mp_err(err, "unsupported_format", "tensor '%s': strided view of %s", t->name,
                      mp_dtype_name(t->dtype));
    size_t es = bits / 8;
    uint64_t numel;
    if (t->ndim < 0 || t->ndim > MP_MAX_DIMS || !mp_shape_numel(t->shape, t->ndim, &numel))
        return mp_err(err, "bad_header", "tensor '%s': bad shape", t->name);
    if (numel > UINT64_MAX / es || numel * es != t->nbytes)
        return mp_err(err, "bad_header", "tensor '%s': nbytes disagrees with shape", t->name);
    if (numel == 0) return 0;
    /* lowest and highest storage element the view touches */
    int64_t lo = t->storage_offset, hi = t->storage_offset, span;
    for (int i = 0; i < t->ndim; i++) {
        int64_t ext;
        if (__builtin_mul_overflow(t->shape[i] - 1, t->strides[i], &ext))
            return mp_err(err, "bad_header", "tensor '%s': strides overflow", t->name);
        if (ext < 0 ? __builtin_add_overflow(lo, ext, &lo) : __builtin_add_overflow(hi, ext, &hi))
            return mp_err(err, "bad_header", "tensor '%s': strides overflow", t->name);
    }
    uint64_t end;
    if (lo < 0 || __builtin_add_overflow(hi, 1, &span) ||
        __builtin_mul_overflow((uint64_t)span, (uint64_t)es, &end) || end > t->data_bytes)
        return mp_err(err, "bad_header", "tensor '%s': view reaches outside its storage", t->name);
    uint64_t first = (uint64_t)lo * es, bytes = end - first;
    const char *base = st_data(w, t);
    if (base) {
        gather(dst, base + first, lo, t, es);
        return 0;
    }
    int fd = w->fds[t->file_index];
    uint64_t foff = t->data_offset + first;
    const char *mapped = mapped_range(w, t->file_index, foff, bytes);
    if (mapped) {
        gather(dst, mapped, lo, t, es);
        return 0;
    }
    if (bytes <= GATHER_READ_MAX) {
        char *buf = malloc(bytes);
        if (!buf) return mp_err(err, "io_error", "out of memory");
        if (weights_pread(fd, buf, bytes, foff, err) != 0) {
            free(buf);
            return -1;
        }
        gather(dst, buf, lo, t, es);
        free(buf);
        return 0;
    }
    /* Mapping past the end of file would turn a short file into SIGBUS. */
    struct stat st;
    if (fstat(fd, &st) != 0) return mp_err(err, "io_error", "fstat: %s", strerror(errno));
    if (foff + bytes > (uint64_t)st.st_size)
        return mp_err(err, "truncated", "tensor '%s': storage beyond end of file", t->name);
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t aoff = foff - foff % (uint64_t)(pg > 0 ? pg : 4096);
    size_t mlen = (size_t)(foff + bytes - aoff);
    void *m = mmap(NULL, mlen, PROT_READ, MAP_PRIVATE, fd, (off_t)aoff);
    if (m == MAP_FAILED) return mp_err(err, "io_error", "mmap: %s", strerror(errno));
    gather(dst, (const char *)m + (foff - aoff), lo, t, es);
    munmap(m, mlen);
    return 0;
}

int weights_read(const mp_weights *w, const mp_tensor *t, void *dst, mp_error *err) {
    if (!w || !t || t->file_index >= w->nfiles)
        return mp_err(err, "bad_request", "tensor does not belong to these weights");
    if (t->data_offset > (uint64_t)INT64_MAX ||
        t->data_bytes > (uint64_t)INT64_MAX - t->data_offset)
        return mp_err(err, "bad_header", "tensor '%s': byte range overflows", t->name);
    uint64_t want;
    if (t->dtype != MP_DT_GGML &&
        (!mp_tensor_bytes(t->dtype, t->shape, t->ndim, &want) || want != t->nbytes))
        return mp_err(err, "bad_header", "tensor '%s': nbytes disagrees with shape", t->name);
    bool contiguous = !t->is_view || (t->dtype != MP_DT_GGML && strides_contiguous(t));
    if (!contiguous) return read_view(w, t, dst, err);
    uint64_t start = 0;
    if (t->storage_offset != 0) {
        unsigned bits = mp_dtype_bits(t->dtype);
        if (t->storage_offset < 0 || bits == 0 || bits % 8 ||
            __builtin_mul_overflow((uint64_t)t->storage_offset, (uint64_t)(bits / 8), &start))
            return mp_err(err, "bad_header", "tensor '%s': bad storage offset", t->name);
    }
    if (start > t->data_bytes || t->nbytes > t->data_bytes - start)
        return mp_err(err, "bad_header",
                      "tensor '%s': %llu bytes at %llu outside its %llu-byte "
                      "storage",
                      t->name, (unsigned long long)t->nbytes, (unsigned long long)start,
                      (unsigned long long)t->data_bytes);
    if (t->nbytes == 0) return 0;
    const char *base = st_data(w, t);
    if (base) {
        copy_out(dst, base + start, t->nbytes);
        return 0;
    }
    const char *mapped = mapped_range(w, t->file_index, t->data_offset + start, t->nbytes);
    if (mapped) {
        copy_out(dst, mapped, t->nbytes);
        return 0;
    }
    if (weights_pread(w->fds[t->file_index], dst, t->nbytes, t->data_offset + start, err) != 0) {
        return mp_err_wrap(err, NULL, "tensor '%s' in %s", t->name, w->files[t->file_index]);
    }
    return 0;
}
