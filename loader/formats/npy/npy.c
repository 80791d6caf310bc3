/*
 * npy.c - read and write NumPy .npy files, and the npcache directory built
 * from them (see npy.h). The header is a Python dict literal; it is parsed by
 * hand with a tiny grammar (exactly descr / fortran_order / shape) rather
 * than anything that evaluates it.
 */
#include "loader/formats/npy/npy.h"
#include "loader/formats/formats_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/formats/safetensors/safetensors.h"

#define NPY_MAX_NAMES_JSON (64u << 20)
#define NPY_GROWTH_DIGITS 21 /* numpy's GROWTH_AXIS_MAX_DIGITS */
#define NPY_ALIGN 64         /* numpy's ARRAY_ALIGN */

static const struct {
    const char *descr;
    mp_dtype dt;
} descr_table[] = {
    {"<f2", MP_DT_F16}, {"<f4", MP_DT_F32},  {"<f8", MP_DT_F64},  {"|i1", MP_DT_I8},
    {"|u1", MP_DT_U8},  {"|b1", MP_DT_BOOL}, {"<i2", MP_DT_I16},  {"<u2", MP_DT_U16},
    {"<i4", MP_DT_I32}, {"<u4", MP_DT_U32},  {"<i8", MP_DT_I64},  {"<u8", MP_DT_U64},
    {"<c8", MP_DT_C64}, /* accepted on read only: */
    {"<i1", MP_DT_I8},  {"<u1", MP_DT_U8},   {"<b1", MP_DT_BOOL},
};

/* What a dtype numpy cannot name is stored as. */
static mp_dtype stored_as(mp_dtype dt) {
    switch (dt) {
    case MP_DT_BF16:
        return MP_DT_U16;
    case MP_DT_F8_E5M2:
    case MP_DT_F8_E4M3:
    case MP_DT_F8_E8M0:
    case MP_DT_F8_E4M3FNUZ:
    case MP_DT_F8_E5M2FNUZ:
        return MP_DT_U8;
    default:
        return dt;
    }
}

const char *npy_descr(mp_dtype dt) {
    dt = stored_as(dt);
    for (size_t i = 0; i < 13; i++)
        if (descr_table[i].dt == dt) return descr_table[i].descr;
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* header parsing                                                            */

typedef struct lex {
    const char *p, *end;
} lex;

static void skip_ws(lex *l) {
    while (l->p < l->end && (*l->p == ' ' || *l->p == '\t' || *l->p == '\n' || *l->p == '\r'))
        l->p++;
}

static bool eat(lex *l, char c) {
    skip_ws(l);
    if (l->p < l->end && *l->p == c) {
        l->p++;
        return true;
    }
    return false;
}

/* A quoted string without escapes, at most cap-1 printable ASCII bytes. */
static bool lex_str(lex *l, char *out, size_t cap) {
    skip_ws(l);
    if (l->p >= l->end || (*l->p != '\'' && *l->p != '"')) return false;
    char q = *l->p++;
    size_t n = 0;
    while (l->p < l->end && *l->p != q) {
        unsigned char c = (unsigned char)*l->p;
        if (c < 0x20 || c >= 0x7f || c == '\\' || n + 1 >= cap) return false;
        out[n++] = (char)c;
        l->p++;
    }
    if (l->p >= l->end) return false;
    l->p++;
    out[n] = 0;
    return true;
}

static bool lex_word(lex *l, const char *w) {
    skip_ws(l);
    size_t n = strlen(w);
    if ((size_t)(l->end - l->p) < n || memcmp(l->p, w, n) != 0) return false;
    l->p += n;
    return true;
}

static bool lex_int(lex *l, int64_t *out) {
    skip_ws(l);
    int64_t v = 0;
    const char *s = l->p;
    while (l->p < l->end && *l->p >= '0' && *l->p <= '9') {
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, *l->p - '0', &v))
            return false;
        l->p++;
    }
    if (l->p == s) return false;
    if (l->p < l->end && *l->p == 'L') l->p++; /* written by Python 2 numpy */
    *out = v;
    return true;
}

static bool lex_shape(lex *l, mp_tensor *t) {
    if (!eat(l, '(')) return false;
    t->ndim = 0;
    if (eat(l, ')')) return true;
    for (;;) {
        int64_t d;
        if (t->ndim >= MP_MAX_DIMS || !lex_int(l, &d)) return false;
        t->shape[t->ndim++] = d;
        bool comma = eat(l, ',');
        if (eat(l, ')')) return t->ndim > 1 || comma; /* "(5)" is an int, not a tuple */
        if (!comma) return false;
    }
}

int npy_parse_header(const unsigned char *buf, size_t len, mp_tensor *t, mp_error *err) {
    if (len < 10) return mp_err(err, "truncated", "npy: file shorter than its preamble");
    if (memcmp(buf, "\x93NUMPY", 6) != 0) return mp_err(err, "bad_header", "npy: bad magic");
    unsigned major = buf[6], minor = buf[7];
    size_t pre, hlen;
    if (major == 1 && minor == 0) {
        pre = 10;
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8;
    } else if ((major == 2 || major == 3) && minor == 0) {
        if (len < 12) return mp_err(err, "truncated", "npy: file shorter than its preamble");
        pre = 12;
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
    } else
        return mp_err(err, "unsupported_format", "npy: version %u.%u", major, minor);
    if (hlen > NPY_MAX_HEADER) return mp_err(err, "too_large", "npy: header of %zu bytes", hlen);
    if (len - pre < hlen) return mp_err(err, "truncated", "npy: header runs past end of file");
    lex l = {(const char *)buf + pre, (const char *)buf + pre + hlen};
    char key[32], descr[32];
    bool have_descr = false, have_fo = false, have_shape = false, fortran = false;
    if (!eat(&l, '{')) return mp_err(err, "bad_header", "npy: header is not a dict");
    if (!eat(&l, '}')) {
        for (;;) {
            if (!lex_str(&l, key, sizeof key) || !eat(&l, ':'))
                return mp_err(err, "bad_header", "npy: malformed header dict");
            bool ok, dup;
            if (strcmp(key, "descr") == 0) {
                dup = have_descr;
                ok = lex_str(&l, descr, sizeof descr);
                have_descr = true;
            } else if (strcmp(key, "fortran_order") == 0) {
                dup = have_fo;
                ok = (fortran = lex_word(&l, "True")) || lex_word(&l, "False");
                have_fo = true;
            } else if (strcmp(key, "shape") == 0) {
                dup = have_shape;
                ok = lex_shape(&l, t);
                have_shape = true;
            } else
                return mp_err(err, "bad_header", "npy: unexpected header key '%s'", key);
            if (dup) return mp_err(err, "bad_header", "npy: header key '%s' repeated", key);
            if (!ok) return mp_err(err, "bad_header", "npy: bad value for '%s'", key);
            bool comma = eat(&l, ',');
            if (eat(&l, '}')) break;
            if (!comma) return mp_err(err, "bad_header", "npy: malformed header dict");
        }
    }
    skip_ws(&l);
    if (l.p != l.end) return mp_err(err, "bad_header", "npy: junk after the header dict");
    if (!have_descr || !have_fo || !have_shape)
        return mp_err(err, "bad_header", "npy: header needs descr, fortran_order and shape");
    t->dtype = MP_DT_INVALID;
    for (size_t i = 0; i < sizeof descr_table / sizeof *descr_table; i++)
        if (strcmp(descr, descr_table[i].descr) == 0) t->dtype = descr_table[i].dt;
    if (t->dtype == MP_DT_INVALID)
        return mp_err(err, "unsupported_format", "npy: dtype '%s' (%s)", descr,
                      descr[0] == '>'      ? "big-endian"
                      : strchr(descr, 'O') ? "object arrays are pickles"
                                           : "not supported");
    uint64_t nb;
    if (!mp_tensor_bytes(t->dtype, t->shape, t->ndim, &nb))
        return mp_err(err, "bad_header", "npy: shape overflows");
    t->nbytes = nb;
    t->data_bytes = nb;
    t->data_offset = pre + hlen;
    t->ggml_type = -1;
    t->storage_id = -1;
    mp_tensor_set_contiguous(t);
    if (fortran && t->ndim > 1) {
        int64_t s = 1;
        for (int i = 0; i < t->ndim; i++) {
            t->strides[i] = s;
            if (__builtin_mul_overflow(s, t->shape[i], &s)) s = 0;
        }
        t->is_view = true;
    }
    return 0;
}

/* Reads and checks the header of an open .npy file (data must end the file). */
static int npy_read_fd(const char *path, int fd, mp_tensor *t, mp_error *err) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return mp_err(err, "unsupported_format", "%s: not a regular file", path);
    /* O_NONBLOCK only kept open() from hanging on a FIFO; the kept fd is plain */
    (void)fcntl(fd, F_SETFL, 0);
    uint64_t size = (uint64_t)st.st_size;
    unsigned char pre[12];
    size_t n = size < 12 ? (size_t)size : 12;
    if (weights_pread(fd, pre, n, 0, err) != 0) return -1;
    size_t need = 12;
    if (n >= 10 && pre[6] == 1)
        need = 10 + ((size_t)pre[8] | (size_t)pre[9] << 8);
    else if (n >= 12 && (pre[6] == 2 || pre[6] == 3))
        need = 12 + ((size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 |
                     (size_t)pre[11] << 24);
    if (need > NPY_MAX_HEADER + 12 || need > size) need = n; /* parse reports it */
    unsigned char *buf = malloc(need ? need : 1);
    if (!buf) return mp_err(err, "io_error", "out of memory");
    int rc = weights_pread(fd, buf, need, 0, err);
    if (rc == 0) rc = npy_parse_header(buf, need, t, err);
    free(buf);
    if (rc != 0) {
        return mp_err_wrap(err, NULL, "%s", path);
    }
    if (t->data_offset + t->nbytes > size)
        return mp_err(err, "truncated", "%s: %llu data bytes expected, %llu present", path,
                      (unsigned long long)t->nbytes, (unsigned long long)(size - t->data_offset));
    if (t->data_offset + t->nbytes < size)
        return mp_err(err, "bad_header", "%s: %llu bytes after the array data", path,
                      (unsigned long long)(size - t->data_offset - t->nbytes));
    return 0;
}

static bool npy_detect(const char *path, const unsigned char *b, size_t n, uint64_t size) {
    return n >= 6 && memcmp(b, "\x93NUMPY", 6) == 0;
}

int npy_open(const char *path, mp_weights *w, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path,
                      strerror(errno));
    w->format = MP_FMT_NPY;
    if (weights_add_file(w, path, fd, err) != 0) {
        close(fd);
        return -1;
    }
    mp_tensor *t = weights_add_tensor(w, err);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t bl = strlen(base);
    if (bl > 4 && strcmp(base + bl - 4, ".npy") == 0) bl -= 4;
    if (!t || !(t->name = strndup(base, bl))) {
        weights_free_fields(w);
        return t ? mp_err(err, "io_error", "out of memory") : -1;
    }
    if (npy_read_fd(path, fd, t, err) != 0) {
        weights_free_fields(w);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* writing                                                                   */

size_t npy_header(mp_dtype dt, const int64_t *shape, int ndim, char *out, size_t cap,
                  mp_error *err) {
    const char *descr = npy_descr(dt);
    if (!descr) {
        mp_err(err, "bad_request", "dtype %s cannot be stored in .npy", mp_dtype_name(dt));
        return 0;
    }
    if (ndim < 0 || ndim > MP_MAX_DIMS) {
        mp_err(err, "bad_request", "npy: %d dims", ndim);
        return 0;
    }
    /* dict text as numpy's repr() of it: keys sorted, "(5,)" for one dim */
    char d[512];
    int n = snprintf(d, sizeof d, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (int i = 0; i < ndim; i++)
        n += snprintf(d + n, sizeof d - (size_t)n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    n += snprintf(d + n, sizeof d - (size_t)n, "%s), }", ndim == 1 ? "," : "");
    if (ndim > 0) {
        /* growth room so numpy can rewrite shape[0] in place */
        int digits = snprintf(NULL, 0, "%lld", (long long)shape[0]);
        for (int i = digits; i < NPY_GROWTH_DIGITS; i++)
            d[n++] = ' ';
    }
    size_t hlen = (size_t)n + 1; /* + '\n' */
    size_t pre = 10;
    size_t pad = NPY_ALIGN - ((pre + hlen) % NPY_ALIGN);
    if (hlen + pad > 65535) { /* never for <= 8 dims; kept for parity with numpy */
        pre = 12;
        pad = NPY_ALIGN - ((pre + hlen) % NPY_ALIGN);
    }
    size_t total = pre + hlen + pad;
    if (total > cap) {
        mp_err(err, "bad_request", "npy header buffer too small");
        return 0;
    }
    size_t hl = hlen + pad;
    memcpy(out, "\x93NUMPY", 6);
    out[6] = pre == 10 ? 1 : 2;
    out[7] = 0;
    out[8] = (char)(hl & 0xff);
    out[9] = (char)((hl >> 8) & 0xff);
    if (pre == 12) {
        out[10] = (char)((hl >> 16) & 0xff);
        out[11] = (char)((hl >> 24) & 0xff);
    }
    memcpy(out + pre, d, (size_t)n);
    memset(out + pre + n, ' ', pad);
    out[total - 1] = '\n';
    return total;
}

static int write_full(int fd, const void *buf, uint64_t len, mp_error *err) {
    const char *p = buf;
    while (len > 0) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t n = write(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "io_error", "write: %s", strerror(errno));
        }
        p += n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Writes parts to path via "<path>.tmp", fsync, rename. */
static int write_atomic(const char *path, const void *a, uint64_t alen, const void *b,
                        uint64_t blen, mp_error *err) {
    size_t pl = strlen(path);
    char *tmp = malloc(pl + 5);
    if (!tmp) return mp_err(err, "io_error", "out of memory");
    memcpy(tmp, path, pl);
    memcpy(tmp + pl, ".tmp", 5);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int rc = mp_err(err, "io_error", "%s: %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    int rc = write_full(fd, a, alen, err);
    if (rc == 0 && blen) rc = write_full(fd, b, blen, err);
    if (rc == 0 && fsync(fd) != 0) rc = mp_err(err, "io_error", "fsync: %s", strerror(errno));
    if (close(fd) != 0 && rc == 0) rc = mp_err(err, "io_error", "close: %s", strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = mp_err(err, "io_error", "rename %s: %s", tmp, strerror(errno));
    if (rc != 0) unlink(tmp);
    free(tmp);
    return rc;
}

int npy_write(const char *path, mp_dtype dt, const int64_t *shape, int ndim, const void *data,
              uint64_t nbytes, mp_error *err) {
    char hdr[1024];
    uint64_t want;
    size_t hl = npy_header(dt, shape, ndim, hdr, sizeof hdr, err);
    if (hl == 0) return -1;
    if (!mp_tensor_bytes(dt, shape, ndim, &want) || want != nbytes)
        return mp_err(err, "bad_request", "npy: %llu data bytes for that shape",
                      (unsigned long long)nbytes);
    return write_atomic(path, hdr, hl, data, nbytes, err);
}

static char *join(const char *dir, const char *name, const char *suffix) {
    size_t a = strlen(dir), b = strlen(name), c = strlen(suffix);
    char *p = malloc(a + b + c + 2);
    if (p) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b);
        memcpy(p + a + 1 + b, suffix, c + 1);
    }
    return p;
}

static bool cache_name_ok(const char *s) {
    return st_plain_file_name(s) && strcmp(s, "weight_names.json") != 0 &&
           strcmp(s, "weight_dtypes.json") != 0;
}

static int cstr_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int check_unique(const char **names, size_t n, const char *code, mp_error *err) {
    if (n > 1) qsort(names, n, sizeof *names, cstr_cmp);
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            return mp_err(err, code, "tensor name '%s' appears twice", names[i]);
    return 0;
}

static int fsync_dir(const char *dir, mp_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || fsync(fd) != 0)
        rc = mp_err(err, "io_error", "fsync %s: %s", dir, strerror(errno));
    if (fd >= 0) close(fd);
    return rc;
}

int npcache_write_dir(const mp_weights *w, const char *dir, mp_error *err) {
    const char **names = malloc((w->ntensors ? w->ntensors : 1) * sizeof *names);
    if (!names) return mp_err(err, "io_error", "out of memory");
    uint64_t maxb = 0;
    int rc = 0;
    for (size_t i = 0; i < w->ntensors && rc == 0; i++) {
        const mp_tensor *t = &w->tensors[i];
        names[i] = t->name;
        if (!cache_name_ok(t->name))
            rc = mp_err(err, "bad_request", "tensor name '%s' cannot be an npcache file name",
                        t->name);
        else if (!npy_descr(t->dtype))
            rc = mp_err(err, "bad_request", "tensor '%s': dtype %s cannot be stored in .npy",
                        t->name,
                        t->dtype == MP_DT_GGML ? "GGML (quantized)" : mp_dtype_name(t->dtype));
        else if (t->nbytes > maxb)
            maxb = t->nbytes;
    }
    if (rc == 0) rc = check_unique(names, w->ntensors, "bad_request", err);
    free(names);
    if (rc != 0) return -1;
    if (maxb > SIZE_MAX) return mp_err(err, "too_large", "tensor too large for memory");
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return mp_err(err, "io_error", "mkdir %s: %s", dir, strerror(errno));
    char *names_path = join(dir, "weight_names.json", "");
    char *dtypes_path = join(dir, "weight_dtypes.json", "");
    json_t *jn = json_array(), *jd = json_object();
    char *buf = malloc(maxb ? (size_t)maxb : 1);
    char *text = NULL;
    if (!names_path || !dtypes_path || !jn || !jd || !buf) {
        rc = mp_err(err, "io_error", "out of memory");
        goto out;
    }
    /* The names file marks the cache complete: drop it before rewriting. */
    if (unlink(names_path) != 0 && errno != ENOENT) {
        rc = mp_err(err, "io_error", "unlink %s: %s", names_path, strerror(errno));
        goto out;
    }
    for (size_t i = 0; i < w->ntensors && rc == 0; i++) {
        const mp_tensor *t = &w->tensors[i];
        char *p = join(dir, t->name, "");
        if (!p) rc = mp_err(err, "io_error", "out of memory");
        if (rc == 0) rc = weights_read(w, t, buf, err);
        if (rc == 0) rc = npy_write(p, t->dtype, t->shape, t->ndim, buf, t->nbytes, err);
        if (rc == 0 && json_array_append_new(jn, json_string(t->name)) != 0)
            rc = mp_err(err, "bad_request", "tensor name '%s' is not UTF-8", t->name);
        if (rc == 0 && stored_as(t->dtype) != t->dtype)
            json_object_set_new(jd, t->name, json_string(mp_dtype_name(t->dtype)));
        free(p);
    }
    if (rc != 0) goto out;
    if (json_object_size(jd) > 0) {
        text = json_dumps(jd, JSON_ENSURE_ASCII | JSON_SORT_KEYS);
        rc = text ? write_atomic(dtypes_path, text, strlen(text), NULL, 0, err)
                  : mp_err(err, "io_error", "out of memory");
        free(text);
        text = NULL;
    } else if (unlink(dtypes_path) != 0 && errno != ENOENT) {
        rc = mp_err(err, "io_error", "unlink %s: %s", dtypes_path, strerror(errno));
    }
    if (rc == 0) rc = fsync_dir(dir, err);
    if (rc != 0) goto out;
    /* same text as Python's json.dump(list) */
    text = json_dumps(jn, JSON_ENSURE_ASCII);
    rc = text ? write_atomic(names_path, text, strlen(text), NULL, 0, err)
              : mp_err(err, "io_error", "out of memory");
    if (rc == 0) rc = fsync_dir(dir, err);
out:
    free(text);
    free(buf);
    json_decref(jn);
    json_decref(jd);
    free(names_path);
    free(dtypes_path);
    return rc;
}

static json_t *load_json(const char *path, bool optional, mp_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (optional && errno == ENOENT) return json_null();
        mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    json_t *j = NULL;
    char *buf = NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        mp_err(err, "bad_header", "%s: not a regular file", path);
    } else if ((uint64_t)st.st_size > NPY_MAX_NAMES_JSON) {
        mp_err(err, "too_large", "%s: %lld bytes", path, (long long)st.st_size);
    } else if (!(buf = malloc((size_t)st.st_size + 1))) {
        mp_err(err, "io_error", "out of memory");
    } else if (weights_pread(fd, buf, (size_t)st.st_size, 0, err) == 0) {
        json_error_t je;
        j = json_loadb(buf, (size_t)st.st_size, JSON_REJECT_DUPLICATES, &je);
        if (!j) mp_err(err, "bad_header", "%s: not valid JSON: %s", path, je.text);
    }
    free(buf);
    close(fd);
    return j;
}

int npcache_open(const char *dir, mp_weights *w, mp_error *err) {
    char *np = join(dir, "weight_names.json", ""), *dp = join(dir, "weight_dtypes.json", "");
    json_t *names = NULL, *dts = NULL;
    const char **sorted = NULL;
    int rc = -1;
    w->format = MP_FMT_NPY;
    if (!np || !dp) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    if (!(names = load_json(np, false, err)) || !(dts = load_json(dp, true, err))) goto out;
    if (!json_is_array(names)) {
        mp_err(err, "bad_header", "%s: not a JSON list", np);
        goto out;
    }
    if (!json_is_null(dts) && !json_is_object(dts)) {
        mp_err(err, "bad_header", "%s: not a JSON object", dp);
        goto out;
    }
    size_t n = json_array_size(names);
    sorted = malloc((n ? n : 1) * sizeof *sorted);
    if (!sorted) {
        mp_err(err, "io_error", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(names, i);
        if (!json_is_string(v) || !cache_name_ok(json_string_value(v))) {
            mp_err(err, "bad_header", "%s: entry %zu is not a usable tensor file name", np, i);
            goto out;
        }
        sorted[i] = json_string_value(v);
    }
    if (check_unique(sorted, n, "bad_header", err) != 0) goto out;
    for (size_t i = 0; i < n; i++) {
        const char *name = json_string_value(json_array_get(names, i));
        char *p = join(dir, name, "");
        if (!p) {
            mp_err(err, "io_error", "out of memory");
            goto out;
        }
        int fd = open(p, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0 && errno == ENOENT) {
            free(p);
            if (!(p = join(dir, name, ".npy"))) {
                mp_err(err, "io_error", "out of memory");
                goto out;
            }
            fd = open(p, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        }
        if (fd < 0) {
            mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", p, strerror(errno));
            free(p);
            goto out;
        }
        int arc = weights_add_file(w, p, fd, err);
        if (arc != 0) close(fd);
        mp_tensor *t = arc == 0 ? weights_add_tensor(w, err) : NULL;
        if (!t) {
            free(p);
            goto out;
        }
        t->file_index = w->nfiles - 1;
        arc = npy_read_fd(p, fd, t, err);
        free(p);
        if (arc != 0) goto out;
        if (!(t->name = strdup(name))) {
            mp_err(err, "io_error", "out of memory");
            goto out;
        }
        json_t *real = json_is_object(dts) ? json_object_get(dts, name) : NULL;
        if (real) {
            mp_dtype dt =
                json_is_string(real) ? mp_dtype_from_name(json_string_value(real)) : MP_DT_INVALID;
            if (dt == MP_DT_INVALID || stored_as(dt) != t->dtype) {
                mp_err(err, "bad_header", "%s: dtype for '%s' does not match its file", dp, name);
                goto out;
            }
            t->dtype = dt;
        }
    }
    rc = 0;
out:
    if (rc != 0) weights_free_fields(w);
    free(sorted);
    json_decref(names);
    json_decref(dts);
    free(np);
    free(dp);
    return rc;
}

const mp_format_handler mp_format_npy = {
    .name = "npy",
    .format = MP_FMT_NPY,
    .detect = npy_detect,
    .open = npy_open,
};
