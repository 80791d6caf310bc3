/*
 * safetensors.c - read, map and write .safetensors files, and read/write the
 * sharded index. Validation follows the reference (SafeTensors::read_metadata
 * + Metadata::validate) and is stricter where it is silent: duplicate keys are
 * rejected instead of surfacing later as a hole in the offsets.
 */
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/formats_internal.h"
#include "util/sbuf.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

static int write_full(int fd, const void *buf, size_t len, mp_error *err) {
    const char *p = buf;
    while (len > 0) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : len;
        ssize_t n = write(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "write: %s", strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* fsync the directory holding path so that a rename survives a crash. */
static int fsync_parent(const char *path, mp_error *err) {
    char *dir = strdup(path);
    if (!dir) return mp_err(err, "io_error", "out of memory");
    char *slash = strrchr(dir, '/');
    const char *d = ".";
    if (slash == dir)
        d = "/";
    else if (slash) {
        *slash = 0;
        d = dir;
    }
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || fsync(fd) != 0) rc = mp_err(err, "io_error", "fsync %s: %s", d, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return rc;
}

static char *tmp_name(const char *path) {
    size_t n = strlen(path);
    char *t = malloc(n + 5);
    if (t) {
        memcpy(t, path, n);
        memcpy(t + n, ".tmp", 5);
    }
    return t;
}

static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else
            return false;
        if (n - i < len) return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* reader                                                                    */

static int tensor_cmp_offset(const void *a, const void *b) {
    const mp_tensor *x = a, *y = b;
    if (x->data_offset != y->data_offset) return x->data_offset < y->data_offset ? -1 : 1;
    if (x->data_bytes != y->data_bytes) return x->data_bytes < y->data_bytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int get_u64(json_t *v, uint64_t *out) {
    if (!json_is_integer(v)) return -1;
    json_int_t i = json_integer_value(v);
    if (i < 0) return -1;
    *out = (uint64_t)i;
    return 0;
}

/* Parses one tensor entry; offsets are kept relative (data_offset = BEGIN,
 * data_bytes = END) until the walk in st_parse_header. */
static int parse_entry(const char *name, json_t *v, mp_tensor *t, mp_error *err) {
    if (!json_is_object(v)) return mp_err(err, "bad_header", "tensor '%s': not an object", name);
    json_t *dt = json_object_get(v, "dtype");
    json_t *shape = json_object_get(v, "shape");
    json_t *offs = json_object_get(v, "data_offsets");
    if (!json_is_string(dt) || !json_is_array(shape) || !json_is_array(offs))
        return mp_err(err, "bad_header", "tensor '%s': needs dtype, shape and data_offsets", name);
    t->dtype = mp_dtype_from_name(json_string_value(dt));
    if (t->dtype == MP_DT_INVALID)
        return mp_err(err, "bad_header", "tensor '%s': unknown dtype '%.32s'", name,
                      json_string_value(dt));
    size_t nd = json_array_size(shape);
    if (nd > MP_MAX_DIMS)
        return mp_err(err, "unsupported_format", "tensor '%s': %zu dims (max %d)", name, nd,
                      MP_MAX_DIMS);
    t->ndim = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (get_u64(json_array_get(shape, i), &d) != 0)
            return mp_err(err, "bad_header", "tensor '%s': shape entries must be integers >= 0",
                          name);
        t->shape[i] = (int64_t)d;
    }
    uint64_t b, e;
    if (json_array_size(offs) != 2 || get_u64(json_array_get(offs, 0), &b) != 0 ||
        get_u64(json_array_get(offs, 1), &e) != 0)
        return mp_err(err, "bad_header", "tensor '%s': data_offsets must be [begin, end]", name);
    t->data_offset = b;
    t->data_bytes = e;
    return 0;
}

int st_parse_header(const char *header, size_t n, uint64_t file_size, mp_weights *w,
                    mp_error *err) {
    json_error_t je;
    /* JSON_REJECT_DUPLICATES: jansson would otherwise keep one of two equal
     * keys silently (safetensors README: duplicates are disallowed). */
    json_t *root = json_loadb(header, n, JSON_REJECT_DUPLICATES, &je);
    if (!root) return mp_err(err, "bad_header", "header is not valid JSON: %s", je.text);
    int rc = -1;
    if (!json_is_object(root)) {
        mp_err(err, "bad_header", "header is not a JSON object");
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (json_is_null(v)) continue;
            if (!json_is_object(v)) {
                mp_err(err, "bad_header", "__metadata__ is not an object");
                goto out;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(v, mk, mv) {
                if (!json_is_string(mv)) {
                    mp_err(err, "bad_header", "__metadata__ value for '%.64s' is not a string", mk);
                    goto out;
                }
            }
            w->metadata = json_incref(v);
            continue;
        }
        mp_tensor *t = weights_add_tensor(w, err);
        if (!t) goto out;
        t->name = strdup(key);
        if (!t->name) {
            mp_err(err, "io_error", "out of memory");
            goto out;
        }
        if (parse_entry(key, v, t, err) != 0) goto out;
    }
    /* The reference validates in offset order, never in JSON key order. */
    if (w->ntensors > 1) qsort(w->tensors, w->ntensors, sizeof *w->tensors, tensor_cmp_offset);
    uint64_t start = 0;
    for (size_t i = 0; i < w->ntensors; i++) {
        mp_tensor *t = &w->tensors[i];
        uint64_t b = t->data_offset, e = t->data_bytes, nb;
        if (b != start || e < b) {
            mp_err(err, "bad_header", "tensor '%s': invalid data_offsets [%llu, %llu]", t->name,
                   (unsigned long long)b, (unsigned long long)e);
            goto out;
        }
        uint64_t numel;
        if (!mp_shape_numel(t->shape, t->ndim, &numel) ||
            numel > UINT64_MAX / mp_dtype_bits(t->dtype)) {
            mp_err(err, "bad_header", "tensor '%s': shape overflows", t->name);
            goto out;
        }
        if (!mp_tensor_bytes(t->dtype, t->shape, t->ndim, &nb)) {
            mp_err(err, "bad_header", "tensor '%s': %s of %llu elements is not whole bytes",
                   t->name, mp_dtype_name(t->dtype), (unsigned long long)numel);
            goto out;
        }
        if (e - b != nb) {
            mp_err(err, "bad_header", "tensor '%s': %llu bytes for %s%s needing %llu", t->name,
                   (unsigned long long)(e - b), mp_dtype_name(t->dtype),
                   t->ndim ? " tensor" : " scalar", (unsigned long long)nb);
            goto out;
        }
        t->data_offset = 8 + (uint64_t)n + b;
        t->data_bytes = nb;
        t->nbytes = nb;
        t->ggml_type = -1;
        t->storage_id = -1;
        t->file_index = 0;
        mp_tensor_set_contiguous(t);
        start = e;
    }
    uint64_t want = 8 + (uint64_t)n + start; /* start <= 2^63, n <= 10^8: no overflow */
    if (want > file_size) {
        mp_err(err, "truncated", "file has %llu bytes, header describes %llu",
               (unsigned long long)file_size, (unsigned long long)want);
        goto out;
    }
    if (want < file_size) {
        mp_err(err, "bad_header", "%llu bytes after the last tensor",
               (unsigned long long)(file_size - want));
        goto out;
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int st_open(const char *path, mp_weights *w, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path,
                      strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mp_err(err, "unsupported_format", "%s: not a regular file", path);
    }
    /* O_NONBLOCK only kept open() from hanging on a FIFO; the kept fd is plain */
    (void)fcntl(fd, F_SETFL, 0);
    w->format = MP_FMT_SAFETENSORS;
    if (weights_add_file(w, path, fd, err) != 0) {
        close(fd);
        return -1;
    }
    uint64_t size = (uint64_t)st.st_size;
    unsigned char lenbuf[8];
    if (size < 8) {
        weights_free_fields(w);
        return mp_err(err, "truncated", "%s: %llu bytes, shorter than the 8-byte header length",
                      path, (unsigned long long)size);
    }
    if (weights_pread(fd, lenbuf, 8, 0, err) != 0) {
        weights_free_fields(w);
        return -1;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | lenbuf[i];
    if (n > ST_MAX_HEADER) {
        weights_free_fields(w);
        return mp_err(err, "too_large", "%s: header length %llu exceeds 100000000", path,
                      (unsigned long long)n);
    }
    if (n > size - 8) {
        weights_free_fields(w);
        return mp_err(err, "truncated", "%s: header length %llu beyond end of file (%llu bytes)",
                      path, (unsigned long long)n, (unsigned long long)size);
    }
    char *hdr = malloc(n ? n : 1);
    if (!hdr) {
        weights_free_fields(w);
        return mp_err(err, "io_error", "out of memory for a %llu-byte header",
                      (unsigned long long)n);
    }
    if (weights_pread(fd, hdr, n, 8, err) != 0 || st_parse_header(hdr, n, size, w, err) != 0) {
        free(hdr);
        weights_free_fields(w);
        return -1;
    }
    free(hdr);
    return 0;
}

/* An 8-byte little-endian header length that fits the file and the
 * reference's cap, then (after optional whitespace) the JSON's '{'. */
static bool st_detect(const char *path, const unsigned char *b, size_t n, uint64_t size) {
    if (n < 9 || size < 8) return false;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | b[i];
    if (hl < 2 || hl > ST_MAX_HEADER || hl > size - 8) return false;
    for (size_t i = 8; i < n; i++) {
        if (b[i] == '{') return true;
        if (b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r') break;
    }
    return false;
}

const mp_format_handler mp_format_safetensors = {
    .name = "safetensors",
    .format = MP_FMT_SAFETENSORS,
    .detect = st_detect,
    .open = st_open,
};

typedef struct st_map {
    void *base;
    size_t len;
} st_map;

static void st_map_free(void *p) {
    st_map *m = p;
    if (m->base) munmap(m->base, m->len);
    free(m);
}

int st_open_mmap(const char *path, mp_weights *w, mp_error *err) {
    if (st_open(path, w, err) != 0) return -1;
    struct stat st;
    st_map *m = calloc(1, sizeof *m);
    if (!m) {
        weights_free_fields(w);
        return mp_err(err, "io_error", "out of memory");
    }
    if (fstat(w->fds[0], &st) != 0) {
        free(m);
        weights_free_fields(w);
        return mp_err(err, "io_error", "%s: fstat: %s", path, strerror(errno));
    }
    m->len = (size_t)st.st_size;
    m->base = mmap(NULL, m->len, PROT_READ, MAP_SHARED, w->fds[0], 0);
    if (m->base == MAP_FAILED) {
        free(m);
        weights_free_fields(w);
        return mp_err(err, "io_error", "%s: mmap: %s", path, strerror(errno));
    }
    w->impl = m;
    w->impl_free = st_map_free;
    return 0;
}

const void *st_data(const mp_weights *w, const mp_tensor *t) {
    if (!w || w->impl_free != st_map_free || !w->impl) return NULL;
    const st_map *m = w->impl;
    if (t->file_index != 0 || t->data_offset > m->len || t->data_bytes > m->len - t->data_offset)
        return NULL;
    return (const char *)m->base + t->data_offset;
}

/* ------------------------------------------------------------------------ */
/* writer                                                                    */

/* A JSON string the way serde_json writes it: only '"', '\\' and control
 * characters are escaped (short forms where JSON has them, else \u00xx in
 * lowercase hex); everything else, including non-ASCII, goes out raw. */
static void sb_jstr(sbuf *b, const char *s) {
    static const char hex[] = "0123456789abcdef";
    sb_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        switch (c) {
        case '"':
            sb_append(b, "\\\"", 2);
            break;
        case '\\':
            sb_append(b, "\\\\", 2);
            break;
        case '\b':
            sb_append(b, "\\b", 2);
            break;
        case '\f':
            sb_append(b, "\\f", 2);
            break;
        case '\n':
            sb_append(b, "\\n", 2);
            break;
        case '\r':
            sb_append(b, "\\r", 2);
            break;
        case '\t':
            sb_append(b, "\\t", 2);
            break;
        default:
            if (c < 0x20) {
                char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
                sb_append(b, u, 6);
            } else
                sb_append(b, (const char *)p, 1);
        }
    }
    sb_append(b, "\"", 1);
}

struct st_writer {
    char *path, *tmp;
    int fd;
    size_t n;
    size_t *order;
    uint64_t *offs; /* input tensor i's data: [offs[2i], offs[2i+1]) (st_writer_pwrite) */
    uint64_t header_len, data_bytes, written;
};

typedef struct wsort {
    const st_wtensor *t;
    size_t idx;
} wsort;

static int wsort_cmp(const void *a, const void *b) {
    const wsort *x = a, *y = b;
    if (x->t->dtype != y->t->dtype) return x->t->dtype > y->t->dtype ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

static int str_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void writer_free(st_writer *w) {
    if (!w) return;
    if (w->fd >= 0) close(w->fd);
    free(w->path);
    free(w->tmp);
    free(w->order);
    free(w->offs);
    free(w);
}

int st_writer_open(const char *path, const st_wtensor *ts, size_t n, const json_t *metadata,
                   st_writer **out, mp_error *err) {
    *out = NULL;
    if (metadata && !json_is_object(metadata))
        return mp_err(err, "bad_request", "metadata must be an object");
    if (n > SIZE_MAX / sizeof(wsort)) return mp_err(err, "too_large", "too many tensors");
    wsort *ws = malloc((n ? n : 1) * sizeof *ws);
    const char **mkeys = NULL;
    sbuf hb = {0};
    st_writer *w = calloc(1, sizeof *w);
    int rc = -1;
    if (!ws || !w) {
        mp_err(err, "io_error", "out of memory");
        goto fail;
    }
    w->fd = -1;
    w->n = n;
    for (size_t i = 0; i < n; i++) {
        const st_wtensor *t = &ts[i];
        uint64_t nb;
        if (!t->name || !utf8_valid((const unsigned char *)t->name, strlen(t->name))) {
            mp_err(err, "bad_request", "tensor %zu: name missing or not UTF-8", i);
            goto fail;
        }
        if (strcmp(t->name, "__metadata__") == 0) {
            mp_err(err, "bad_request", "'__metadata__' is reserved and cannot name a tensor");
            goto fail;
        }
        if (t->dtype <= MP_DT_INVALID || t->dtype >= MP_DT_GGML) {
            mp_err(err, "bad_request", "tensor '%s': dtype has no safetensors name", t->name);
            goto fail;
        }
        if (t->ndim < 0 || t->ndim > MP_MAX_DIMS ||
            !mp_tensor_bytes(t->dtype, t->shape, t->ndim, &nb)) {
            mp_err(err, "bad_request", "tensor '%s': bad shape for %s", t->name,
                   mp_dtype_name(t->dtype));
            goto fail;
        }
        ws[i].t = t;
        ws[i].idx = i;
    }
    if (n > 1) qsort(ws, n, sizeof *ws, wsort_cmp);
    /* Duplicates are adjacent only after sorting by name alone; dtype comes
     * first in the file order, so check names separately. */
    {
        const char **names = malloc((n ? n : 1) * sizeof *names);
        if (!names) {
            mp_err(err, "io_error", "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < n; i++)
            names[i] = ts[i].name;
        if (n > 1) qsort(names, n, sizeof *names, str_cmp);
        for (size_t i = 1; i < n; i++)
            if (strcmp(names[i - 1], names[i]) == 0) {
                mp_err(err, "bad_request", "duplicate tensor name '%s'", names[i]);
                free(names);
                goto fail;
            }
        free(names);
    }
    w->order = malloc((n ? n : 1) * sizeof *w->order);
    w->offs = malloc((n ? n : 1) * 2 * sizeof *w->offs);
    if (!w->order || !w->offs) {
        mp_err(err, "io_error", "out of memory");
        goto fail;
    }
    sb_append(&hb, "{", 1);
    bool first = true;
    if (metadata) {
        size_t nk = json_object_size(metadata), k = 0;
        mkeys = malloc((nk ? nk : 1) * sizeof *mkeys);
        if (!mkeys) {
            mp_err(err, "io_error", "out of memory");
            goto fail;
        }
        const char *key;
        json_t *v;
        json_object_foreach((json_t *)metadata, key, v) {
            if (!json_is_string(v)) {
                mp_err(err, "bad_request", "metadata value for '%s' is not a string", key);
                goto fail;
            }
            mkeys[k++] = key;
        }
        if (nk > 1) qsort(mkeys, nk, sizeof *mkeys, str_cmp);
        sb_puts(&hb, "\"__metadata__\":{");
        for (size_t i = 0; i < nk; i++) {
            if (i) sb_append(&hb, ",", 1);
            sb_jstr(&hb, mkeys[i]);
            sb_append(&hb, ":", 1);
            sb_jstr(&hb, json_string_value(json_object_get(metadata, mkeys[i])));
        }
        sb_append(&hb, "}", 1);
        first = false;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const st_wtensor *t = ws[i].t;
        uint64_t nb = 0;
        mp_tensor_bytes(t->dtype, t->shape, t->ndim, &nb);
        w->order[i] = ws[i].idx;
        w->offs[2 * ws[i].idx] = off;
        if (!first) sb_append(&hb, ",", 1);
        first = false;
        sb_jstr(&hb, t->name);
        sb_puts(&hb, ":{\"dtype\":\"");
        sb_puts(&hb, mp_dtype_name(t->dtype));
        sb_puts(&hb, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) sb_append(&hb, ",", 1);
            sb_printf(&hb, "%llu", (unsigned long long)((uint64_t)t->shape[d]));
        }
        sb_puts(&hb, "],\"data_offsets\":[");
        sb_printf(&hb, "%llu", (unsigned long long)(off));
        sb_append(&hb, ",", 1);
        if (__builtin_add_overflow(off, nb, &off) || off > (uint64_t)INT64_MAX) {
            mp_err(err, "too_large", "total tensor size overflows");
            goto fail;
        }
        sb_printf(&hb, "%llu", (unsigned long long)(off));
        sb_puts(&hb, "]}");
        w->offs[2 * ws[i].idx + 1] = off;
        if (hb.len > ST_MAX_HEADER) break;
    }
    sb_append(&hb, "}", 1);
    while (!hb.oom && hb.len % 8)
        sb_append(&hb, " ", 1);
    if (hb.oom) {
        mp_err(err, "io_error", "out of memory building the header");
        goto fail;
    }
    if (hb.len > ST_MAX_HEADER) {
        mp_err(err, "too_large", "header would be %zu bytes (max 100000000)", hb.len);
        goto fail;
    }
    w->header_len = hb.len;
    w->data_bytes = off;
    w->path = strdup(path);
    w->tmp = tmp_name(path);
    if (!w->path || !w->tmp) {
        mp_err(err, "io_error", "out of memory");
        goto fail;
    }
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        mp_err(err, "io_error", "%s: %s", w->tmp, strerror(errno));
        goto fail;
    }
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++)
        lenbuf[i] = (unsigned char)(w->header_len >> (8 * i));
    if (write_full(w->fd, lenbuf, 8, err) != 0 || write_full(w->fd, hb.buf, hb.len, err) != 0) {
        unlink(w->tmp);
        goto fail;
    }
    *out = w;
    w = NULL;
    rc = 0;
fail:
    writer_free(w);
    free(ws);
    free(mkeys);
    sb_free(&hb);
    return rc;
}

size_t st_writer_order(const st_writer *w, size_t k) {
    return k < w->n ? w->order[k] : SIZE_MAX;
}

uint64_t st_writer_data_bytes(const st_writer *w) {
    return w->data_bytes;
}

uint64_t st_writer_header_len(const st_writer *w) {
    return w->header_len;
}

int st_writer_write(st_writer *w, const void *buf, size_t len, mp_error *err) {
    if (len > w->data_bytes - w->written)
        return mp_err(err, "bad_request", "more tensor data than the header declares");
    if (write_full(w->fd, buf, len, err) != 0) return -1;
    w->written += len;
    return 0;
}

int st_writer_pwrite(st_writer *w, size_t i, uint64_t off, const void *buf, size_t len,
                     mp_error *err) {
    if (i >= w->n) return mp_err(err, "bad_request", "no tensor %zu in this file", i);
    uint64_t start = w->offs[2 * i], size = w->offs[2 * i + 1] - start;
    if (off > size || len > size - off)
        return mp_err(err, "bad_request", "more data than tensor %zu's size", i);
    uint64_t at = 8 + w->header_len + start + off;
    const char *p = buf;
    while (len > 0) {
        ssize_t k = pwrite(w->fd, p, len, (off_t)at);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return mp_err(err, "io_error", "write %s: %s", w->tmp, strerror(errno));
        p += k;
        at += (uint64_t)k;
        len -= (size_t)k;
        w->written += (uint64_t)k;
    }
    return 0;
}

int st_writer_finish(st_writer *w, mp_error *err) {
    int rc = 0;
    if (w->written != w->data_bytes)
        rc = mp_err(err, "bad_request", "%llu of %llu tensor bytes written",
                    (unsigned long long)w->written, (unsigned long long)w->data_bytes);
    else if (fsync(w->fd) != 0)
        rc = mp_err(err, "io_error", "fsync %s: %s", w->tmp, strerror(errno));
    if (close(w->fd) != 0 && rc == 0) rc = mp_err(err, "io_error", "close: %s", strerror(errno));
    w->fd = -1;
    if (rc == 0 && rename(w->tmp, w->path) != 0)
        rc = mp_err(err, "io_error", "rename %s: %s", w->tmp, strerror(errno));
    if (rc != 0)
        unlink(w->tmp);
    else
        rc = fsync_parent(w->path, err);
    writer_free(w);
    return rc;
}

int st_writer_end(st_writer *w, int rc, mp_error *err) {
    if (!w) return rc;
    if (rc != 0) {
        st_writer_abort(w);
        return rc;
    }
    return st_writer_finish(w, err);
}

void st_writer_abort(st_writer *w) {
    if (!w) return;
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    unlink(w->tmp);
    writer_free(w);
}

/* ------------------------------------------------------------------------ */
/* index                                                                     */

#define ST_MAX_INDEX (256u << 20)

bool st_plain_file_name(const char *s) {
    if (!s || !*s || strcmp(s, ".") == 0 || strcmp(s, "..") == 0) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p == '/' || *p == '\\' || *p < 0x20) return false;
    return strlen(s) <= NAME_MAX;
}

void st_index_free(st_index *idx) {
    if (!idx) return;
    for (size_t i = 0; i < idx->nfiles; i++)
        free(idx->files[i]);
    for (size_t i = 0; i < idx->nnames; i++)
        free(idx->names[i]);
    free(idx->files);
    free(idx->names);
    free(idx->file_of);
    json_decref(idx->metadata);
    memset(idx, 0, sizeof *idx);
}

static int index_parse(json_t *root, st_index *idx, mp_error *err) {
    if (!json_is_object(root)) return mp_err(err, "bad_header", "index is not a JSON object");
    json_t *md = json_object_get(root, "metadata");
    if (md && !json_is_null(md)) {
        if (!json_is_object(md))
            return mp_err(err, "bad_header", "index metadata is not an object");
        idx->metadata = json_incref(md);
        json_t *ts = json_object_get(md, "total_size");
        if (ts) {
            double d = json_is_real(ts) ? json_real_value(ts) : -1;
            if (json_is_integer(ts) && json_integer_value(ts) >= 0)
                idx->total_size = (uint64_t)json_integer_value(ts);
            else if (json_is_real(ts) && d >= 0 && d < 9.2e18 && d == (double)(uint64_t)d)
                idx->total_size = (uint64_t)d; /* some writers emit 1.6e10 */
            else
                return mp_err(err, "bad_header", "index metadata.total_size is not a size");
            idx->has_total_size = true;
        }
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) return mp_err(err, "bad_header", "index has no weight_map object");
    size_t n = json_object_size(wm);
    idx->names = calloc(n ? n : 1, sizeof *idx->names);
    idx->file_of = calloc(n ? n : 1, sizeof *idx->file_of);
    const char **fn = calloc(n ? n : 1, sizeof *fn);
    if (!idx->names || !idx->file_of || !fn) {
        free(fn);
        return mp_err(err, "io_error", "out of memory");
    }
    const char *key;
    json_t *v;
    size_t k = 0;
    json_object_foreach(wm, key, v) {
        if (!json_is_string(v) || !st_plain_file_name(json_string_value(v))) {
            free(fn);
            return mp_err(err, "bad_header",
                          "weight_map['%.200s'] is not a plain file name in the index's directory",
                          key);
        }
        idx->names[k] = strdup(key);
        if (!idx->names[k]) {
            free(fn);
            return mp_err(err, "io_error", "out of memory");
        }
        idx->nnames = ++k;
    }
    if (n > 1) qsort(idx->names, n, sizeof *idx->names, str_cmp);
    for (size_t i = 0; i < n; i++)
        fn[i] = json_string_value(json_object_get(wm, idx->names[i]));
    /* distinct file names, sorted */
    const char **sf = malloc((n ? n : 1) * sizeof *sf);
    if (!sf) {
        free(fn);
        return mp_err(err, "io_error", "out of memory");
    }
    memcpy(sf, fn, n * sizeof *sf);
    if (n > 1) qsort(sf, n, sizeof *sf, str_cmp);
    idx->files = calloc(n ? n : 1, sizeof *idx->files);
    int rc = 0;
    if (!idx->files) rc = mp_err(err, "io_error", "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (i && strcmp(sf[i], sf[i - 1]) == 0) continue;
        idx->files[idx->nfiles] = strdup(sf[i]);
        if (!idx->files[idx->nfiles])
            rc = mp_err(err, "io_error", "out of memory");
        else
            idx->nfiles++;
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        size_t lo = 0, hi = idx->nfiles;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            int c = strcmp(idx->files[mid], fn[i]);
            if (c == 0) {
                lo = mid;
                break;
            }
            if (c < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        idx->file_of[i] = (uint32_t)lo;
    }
    free(sf);
    free(fn);
    return rc;
}

int st_index_read(const char *path, st_index *idx, mp_error *err) {
    memset(idx, 0, sizeof *idx);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path,
                      strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mp_err(err, "bad_header", "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > ST_MAX_INDEX) {
        close(fd);
        return mp_err(err, "too_large", "%s: index of %lld bytes", path, (long long)st.st_size);
    }
    size_t len = (size_t)st.st_size;
    char *buf = malloc(len ? len : 1);
    if (!buf) {
        close(fd);
        return mp_err(err, "io_error", "out of memory");
    }
    int rc = weights_pread(fd, buf, len, 0, err);
    close(fd);
    if (rc != 0) {
        free(buf);
        return -1;
    }
    json_error_t je;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
    free(buf);
    if (!root) return mp_err(err, "bad_header", "%s: not valid JSON: %s", path, je.text);
    rc = index_parse(root, idx, err);
    json_decref(root);
    if (rc != 0) st_index_free(idx);
    return rc;
}

int st_index_write(const char *path, const st_index *idx, mp_error *err) {
    json_t *root = json_object();
    json_t *md = idx->metadata ? json_deep_copy(idx->metadata) : json_object();
    json_t *wm = json_object();
    int rc = -1;
    char *text = NULL, *tmp = NULL;
    int fd = -1;
    if (!root || !md || !wm || !json_is_object(md)) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    if (json_object_set_new(md, "total_size", json_integer((json_int_t)idx->total_size)) != 0) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < idx->nnames; i++) {
        if (idx->file_of[i] >= idx->nfiles || !st_plain_file_name(idx->files[idx->file_of[i]])) {
            mp_err(err, "bad_request", "tensor '%s': bad shard file", idx->names[i]);
            goto out;
        }
        if (json_object_set_new(wm, idx->names[i], json_string(idx->files[idx->file_of[i]])) != 0) {
            mp_err(err, "bad_request", "tensor name %zu is not UTF-8", i);
            goto out;
        }
    }
    json_object_set(root, "metadata", md);
    json_object_set(root, "weight_map", wm);
    text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_ENSURE_ASCII);
    tmp = tmp_name(path);
    if (!text || !tmp) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        mp_err(err, "io_error", "%s: %s", tmp, strerror(errno));
        goto out;
    }
    if (write_full(fd, text, strlen(text), err) != 0 || write_full(fd, "\n", 1, err) != 0)
        goto out_unlink;
    if (fsync(fd) != 0) {
        mp_err(err, "io_error", "fsync %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    close(fd);
    fd = -1;
    if (rename(tmp, path) != 0) {
        mp_err(err, "io_error", "rename %s: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    rc = fsync_parent(path, err);
    goto out;
out_unlink:
    unlink(tmp);
out:
    if (fd >= 0) close(fd);
    free(text);
    free(tmp);
    json_decref(md);
    json_decref(wm);
    json_decref(root);
    return rc;
}
